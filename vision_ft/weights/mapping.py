"""Map timm state-dict keys onto NNX parameter paths with ordered ``(regex, kind, target)`` rules.

Each architecture module declares a table of :class:`MappingRule`. A rule matches a timm *module*
path (``layer1.0.conv1``) and its ``kind`` says how that module's tensors become NNX variables:
PyTorch's OIHW conv kernels become HWIO, linear weights are transposed, BatchNorm's running
statistics become ``mean``/``var``. ``PARAM`` rules match a whole key (``cls_token``) instead.
Every key must be claimed by a rule and every model variable must be filled, or loading fails
with one error that lists every problem.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flax import nnx


class Kind(enum.Enum):
    CONV = "conv"
    LINEAR = "linear"
    BATCHNORM = "batchnorm"
    LAYERNORM = "layernorm"
    PARAM = "param"


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO (depthwise: (C,1,h,w) -> (h,w,1,C))


def _linear_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)


def _same(w: np.ndarray) -> np.ndarray:
    return w


_KERNEL_RANKS = {_conv_kernel: 4, _linear_kernel: 2}


# timm parameter name -> (NNX variable name, transform), per module kind
_SUFFIXES: dict[Kind, dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]] = {
    Kind.CONV: {"weight": ("kernel", _conv_kernel), "bias": ("bias", _same)},
    Kind.LINEAR: {"weight": ("kernel", _linear_kernel), "bias": ("bias", _same)},
    Kind.BATCHNORM: {
        "weight": ("scale", _same),
        "bias": ("bias", _same),
        "running_mean": ("mean", _same),
        "running_var": ("var", _same),
    },
    Kind.LAYERNORM: {"weight": ("scale", _same), "bias": ("bias", _same)},
}


@dataclass(frozen=True)
class MappingRule:
    """``pattern`` is a regex matched in full against a timm module path (a whole key for PARAM).
    ``target`` is an ``re`` replacement template giving the NNX path; ``None`` keeps the path."""

    pattern: str
    kind: Kind
    target: str | None = None

    def apply(self, key: str) -> tuple[str, np.ndarray | None, Callable] | None:
        if self.kind is Kind.PARAM:
            m = re.fullmatch(self.pattern, key)
            if m is None:
                return None
            return (m.expand(self.target) if self.target else key), None, _same
        module, _, param = key.rpartition(".")
        suffix = _SUFFIXES[self.kind].get(param)
        m = re.fullmatch(self.pattern, module)
        if m is None or suffix is None:
            return None
        nnx_module = m.expand(self.target) if self.target else module
        return f"{nnx_module}.{suffix[0]}", None, suffix[1]


def conv(pattern: str, target: str | None = None) -> MappingRule:
    return MappingRule(pattern, Kind.CONV, target)


def linear(pattern: str, target: str | None = None) -> MappingRule:
    return MappingRule(pattern, Kind.LINEAR, target)


def batchnorm(pattern: str, target: str | None = None) -> MappingRule:
    return MappingRule(pattern, Kind.BATCHNORM, target)


def layernorm(pattern: str, target: str | None = None) -> MappingRule:
    return MappingRule(pattern, Kind.LAYERNORM, target)


def param(pattern: str, target: str | None = None) -> MappingRule:
    return MappingRule(pattern, Kind.PARAM, target)


class WeightLoadError(ValueError):
    """A checkpoint does not fit a model; the message lists every offending key."""


Path = tuple[str | int, ...]


def parse_path(dotted: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def format_path(path: Path) -> str:
    return ".".join(str(p) for p in path)


def variable_shapes(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
    """The shape of every parameter and batch statistic of ``model`` by NNX path; an abstract
    model (``nnx.eval_shape``) has them too."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {tuple(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def _first_match(rules: Sequence[MappingRule], key: str):
    for rule in rules:
        hit = rule.apply(key)
        if hit is not None:
            return hit
    return None


def match_state_dict(
    shapes: dict[Path, tuple[int, ...]],
    state_dict: dict[str, np.ndarray],
    rules: Sequence[MappingRule],
    *,
    ignore: Iterable[str] = (),
    keep_model_init: Iterable[str] = (),
    model_name: str = "the model",
    source: str = "checkpoint",
) -> dict[Path, np.ndarray]:
    """The checkpoint's arrays by model path, transformed to NNX layout, for a model whose
    variables have ``shapes``; raises :class:`WeightLoadError` listing every key that does not fit.

    Only shapes are needed, so a model that was never initialised (``nnx.eval_shape``) can be
    checked and filled.
    """
    ignore_res = [re.compile(p) for p in ignore]
    keep_res = [re.compile(p) for p in keep_model_init]
    unexpected, mismatched, updates = [], [], {}
    mismatched_paths = set()
    for key, value in state_dict.items():
        if any(r.fullmatch(key) for r in ignore_res):
            continue
        hit = _first_match(rules, key)
        path = parse_path(hit[0]) if hit else None
        if path is None or path not in shapes:
            unexpected.append(key if hit is None else f"{key} (-> {hit[0]})")
            continue
        value = np.asarray(value)
        rank = _KERNEL_RANKS.get(hit[2])
        if rank is not None and value.ndim != rank:  # the transpose would fail without naming the key
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)}, {value.ndim}-D where the model's {shapes[path]} "
                f"kernel takes a {rank}-D tensor"
            )
            mismatched_paths.add(path)
            continue
        array = hit[2](value)
        if array.shape != shapes[path]:
            mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs model {shapes[path]}")
            mismatched_paths.add(path)
            continue
        if path in updates:
            unexpected.append(f"{key} (-> {hit[0]}, already filled)")
            continue
        updates[path] = array
    missing = [
        format_path(p)
        for p in shapes
        if p not in updates
        and p not in mismatched_paths
        and not any(r.fullmatch(format_path(p)) for r in keep_res)
    ]
    if missing or unexpected or mismatched:
        raise WeightLoadError(
            mismatch_summary(f"{source} does not fit {model_name}", missing, unexpected, mismatched)
        )
    return updates


def mismatch_summary(
    headline: str, missing: list[str], unexpected: list[str], mismatched: list[str], shown: int = 6
) -> str:
    """One line for an error: ``headline``, then each kind of mismatch counted, with its first
    ``shown`` names (a checkpoint of another architecture misses hundreds of tensors)."""
    parts = [headline]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            parts.append(f"{title} ({len(items)}): {', '.join(items[:shown])}{more}")
    return "; ".join(parts)
