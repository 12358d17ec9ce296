"""Layer groups of a model, as timm's ``group_matcher``/``group_parameters`` define them.

A model's ``group_matcher(coarse)`` gives regexes for its stem and its blocks (or stages). Every
parameter path gets a layer id: 0 for the stem, then one per block in order, and the last id for
whatever no pattern claims (neck, final norm, head). Layer-wise LR decay and the named groups of
``--freeze`` (``stem``, ``blocks.N``, ``stages.N``, ``head``, ``backbone``) are built on these ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flax import nnx

from vision_ft.weights.mapping import format_path

# timm's marker that a pattern's parameters join the previous group (e.g. a final norm)
MATCH_PREVIOUS_GROUP = 99999


def param_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of every trainable parameter, in a stable order."""
    return [format_path(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _compile(matcher: dict) -> list[tuple[re.Pattern, int, tuple | None]]:
    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        if isinstance(spec, list | tuple):
            compiled += [(re.compile(pattern), ordinal, suffix) for pattern, suffix in spec]
        else:
            compiled.append((re.compile(spec), ordinal, None))
    return compiled


def _ordinal(path: str, compiled) -> tuple[float, ...]:
    for pattern, ordinal, suffix in compiled:
        m = pattern.match(path)
        if m:
            parts = (ordinal, *(g for g in m.groups() if g is not None), *(suffix or ()))
            return tuple(float(p) for p in parts)
    return (float("inf"),)


def layer_ids(paths: Iterable[str], matcher: dict) -> dict[str, int]:
    """Map each parameter path to its layer id, numbering matched groups in sorted order."""
    compiled = _compile(matcher)
    by_ordinal: dict[tuple, list[str]] = {}
    for path in paths:
        by_ordinal.setdefault(_ordinal(path, compiled), []).append(path)
    ids, layer = {}, -1
    for key in sorted(by_ordinal):
        if layer < 0 or key[-1] != MATCH_PREVIOUS_GROUP:
            layer += 1
        for path in by_ordinal[key]:
            ids[path] = layer
    return ids


def layer_decay_scales(model: nnx.Module, decay: float) -> dict[str, float]:
    """LR multiplier per parameter for layer-wise decay: ``decay ** (last_layer - layer)``."""
    ids = layer_ids(param_paths(model), model.group_matcher(coarse=False))
    last = max(ids.values())
    return {path: decay ** (last - layer) for path, layer in ids.items()}


GROUP_RANGE = re.compile(r"^(blocks|stages)\.(\d+)(?:-(\d+))?$")


def named_group(model: nnx.Module, name: str) -> set[str]:
    """Parameter paths of a named group: ``stem``, ``blocks.N``/``blocks.A-B`` (fine-grained
    blocks, 0-based), ``stages.N``/``stages.A-B`` (coarse stages, 0-based), ``head`` (what no
    stem or block pattern claims: final norm, classifier) or ``backbone`` (all but the head)."""
    paths = param_paths(model)
    unmatched = (float("inf"),)
    compiled = _compile(model.group_matcher(coarse=False))
    head = {p for p in paths if _ordinal(p, compiled) == unmatched}
    if name == "head":
        return head
    if name == "backbone":
        return set(paths) - head
    if name == "stem":
        return {p for p, i in layer_ids(paths, model.group_matcher(coarse=False)).items() if i == 0}
    m = GROUP_RANGE.match(name)
    if m is None:
        raise ValueError(f"unknown group {name!r}: use stem, head, backbone, blocks.N[-M] or stages.N[-M]")
    kind, first = m.group(1), int(m.group(2))
    final = int(m.group(3)) if m.group(3) else first
    ids = layer_ids(paths, model.group_matcher(coarse=kind == "stages"))
    count = max(i for p, i in ids.items() if p not in head)  # ids 1..count are blocks/stages
    if first > final:
        raise ValueError(f"group {name!r} runs backwards: write {kind}.{final}-{first}")
    if final >= count:
        raise ValueError(f"group {name!r} out of range: this model has {kind}.0-{count - 1}")
    return {p for p, i in ids.items() if first + 1 <= i <= final + 1 and p not in head}
