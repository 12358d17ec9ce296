"""Per-parameter fine-tuning settings from ordered ``(pattern, value)`` rules, big_vision style.

A pattern is a regex matched in full against a dotted NNX parameter path, or a named group of the
model (``stem``, ``blocks.N``, ``stages.A-B``, ``head``, ``backbone``; see ``groups.py``). For LR
multipliers the first matching rule wins and every parameter must match one, or building the plan
fails and names the parameters left over.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from flax import nnx

from vision_ft.train.config import valid_lr_multiplier
from vision_ft.train.groups import GROUP_RANGE, layer_decay_scales, named_group, param_paths
from vision_ft.weights.mapping import format_path

_GROUP_NAMES = ("stem", "head", "backbone")
# Parameters that are embeddings rather than weights: weight decay would pull them to zero.
_NO_DECAY_NAMES = re.compile(r"(^|\.)(pos_embed|cls_token|reg_token|dist_token|mask_token)$")


class RuleError(ValueError):
    """Rules that do not cover the model, or name a group it lacks."""


@dataclass(frozen=True)
class ParamSetting:
    trainable: bool
    lr_scale: float
    weight_decay: bool


def _is_group(pattern: str) -> bool:
    return pattern in _GROUP_NAMES or GROUP_RANGE.match(pattern) is not None


def resolve_pattern(model: nnx.Module, pattern: str, paths: Sequence[str]) -> set[str]:
    """Paths matched by a named group or by a full-match regex."""
    if _is_group(pattern):
        try:
            return named_group(model, pattern)
        except ValueError as e:
            raise RuleError(str(e)) from None
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise RuleError(f"bad pattern {pattern!r}: {e}") from None
    return {p for p in paths if regex.fullmatch(p)}


def decays(path: str, ndim: int) -> bool:
    """timm's rule: no weight decay on biases, norm scales and other 1-D tensors, nor tokens."""
    return ndim > 1 and not path.endswith(".bias") and not _NO_DECAY_NAMES.search(path)


def build_plan(
    model: nnx.Module,
    *,
    freeze: Sequence[str] = (),
    lr_rules: Sequence[tuple[str, float]] = ((".*", 1.0),),
    layer_decay: float | None = None,
) -> dict[str, ParamSetting]:
    """The setting of every parameter: frozen or not, its LR multiplier, weight decay or not."""
    shapes = {format_path(p): v.get_value().ndim for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    paths = param_paths(model)
    frozen: set[str] = set()
    for pattern in freeze:
        hit = resolve_pattern(model, pattern, paths)
        if not hit:
            raise RuleError(f"--freeze {pattern!r} matches no parameter")
        frozen |= hit
    scales: dict[str, float] = {}
    earlier: list[tuple[str, set[str]]] = []
    for pattern, scale in lr_rules:
        if not valid_lr_multiplier(scale):
            raise RuleError(f"LR rule {pattern!r}: multiplier {scale} must be finite and >= 0 (0 freezes)")
        hit = resolve_pattern(model, pattern, paths)
        if not hit:
            raise RuleError(f"LR rule {pattern!r} matches no parameter")
        # the first matching rule wins, so a rule inside an earlier, broader one is dead: a mistake
        # where it means another multiplier ('head' after '.*'); a catch-all after rules that cover
        # everything between them is a safety net, and passes
        broader = [other for other, matched in earlier if hit <= matched]
        if broader and any(scales[path] != scale for path in hit):
            raise RuleError(
                f"LR rule {pattern!r} sets nothing: earlier rule {broader[0]!r} matches every parameter "
                "it does, and the first matching rule wins; put it before that one"
            )
        earlier.append((pattern, hit))
        for path in hit - scales.keys():
            scales[path] = float(scale)
    unmatched = [p for p in paths if p not in scales]
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
        raise RuleError(f"{len(unmatched)} parameters match no LR rule: {shown}; add a catch-all '.*' rule")
    if layer_decay is not None and layer_decay != 1.0:
        for path, factor in layer_decay_scales(model, layer_decay).items():
            scales[path] *= factor
    plan = {
        p: ParamSetting(
            trainable=p not in frozen and scales[p] > 0, lr_scale=scales[p], weight_decay=decays(p, shapes[p])
        )
        for p in paths
    }
    if not any(setting.trainable for setting in plan.values()):
        culprits = [f"--freeze {', '.join(freeze)}"] if freeze else []
        if any(scale == 0 for _, scale in lr_rules):
            culprits.append(f"lr_rules {[tuple(rule) for rule in lr_rules]}")
        raise RuleError(f"no parameter left to train: {' and '.join(culprits)} freeze all {len(plan)}")
    return plan
