"""Model registry: timm's architecture names, their default pretrained configs and weight rules."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flax import nnx

from vision_ft.weights.mapping import MappingRule


@dataclass(frozen=True)
class PretrainedCfg:
    """What a checkpoint expects of its inputs, as in timm's ``pretrained_cfg``.

    ``first_conv`` and ``classifier`` are module paths; they are the same in timm's state dict and
    in the NNX module because every port mirrors timm's module names.
    """

    architecture: str
    tag: str = ""
    hf_hub_id: str | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    num_classes: int = 1000
    first_conv: str = "conv1"
    classifier: str = "fc"
    license: str | None = None

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}" if self.tag else self.architecture


StateDict = dict[str, np.ndarray]
StateDictFilter = Callable[[StateDict, nnx.Module], StateDict]
# (the model a run saved, the model at another input size, its weights by NNX path) -> adapted weights
SizeAdapter = Callable[[nnx.Module, nnx.Module, dict[tuple, np.ndarray]], dict[tuple, np.ndarray]]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    build: Callable[..., nnx.Module]
    default_cfg: PretrainedCfg
    rules: Sequence[MappingRule]
    tags: tuple[str, ...] = ()
    # timm's checkpoint_filter_fn analogue: reshapes a checkpoint for this model before mapping.
    filter_state_dict: StateDictFilter | None = None
    # the classifier weight's key in layouts filter_state_dict renames, so that num_classes=None can
    # read the checkpoint's classes before the model (which the filter needs) exists
    classifier_aliases: tuple[str, ...] = ()
    # keys timm's state dict holds that carry no parameter (BatchNorm's step counter, buffers)
    ignore_keys: tuple[str, ...] = field(default=(r".*num_batches_tracked$",))
    # for architectures with weights shaped by the input size (ViT's position embeddings): a run's
    # weights made fit for the same model at another --img-size, as timm's filter does for checkpoints
    adapt_to_img_size: SizeAdapter | None = None


_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(KeyError):
    """No registered architecture has this name."""


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def get_model_entry(name: str) -> ModelEntry:
    _import_families()
    base = name.split(".", 1)[0]
    if base not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{base[:6]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; see `vision-ft models`")
    entry = _REGISTRY[base]
    if "." in name:
        tag = name.split(".", 1)[1]
        entry = dataclasses.replace(entry, default_cfg=cfg_for_tag(entry, tag))
    return entry


def cfg_for_tag(entry: ModelEntry, tag: str) -> PretrainedCfg:
    """timm's pretrained_cfg of ``entry.name.tag``: the default's, with what timm gives the tag
    otherwise (input size, crop, normalization, classes, license: ``pretrained_tags.json``)."""
    cfg = entry.default_cfg
    if tag == cfg.tag:
        return cfg
    if tag not in entry.tags:
        raise UnknownModelError(
            f"unknown pretrained tag {entry.name}.{tag}; {entry.name} has {', '.join(entry.tags) or 'none'}"
        )
    changed = _tag_differences().get(f"{entry.name}.{tag}", {})
    changed = {k: tuple(v) if isinstance(v, list) else v for k, v in changed.items()}
    return dataclasses.replace(cfg, tag=tag, hf_hub_id=f"timm/{entry.name}.{tag}", **changed)


@functools.cache
def _tag_differences() -> dict[str, dict]:
    # written from timm by scripts/write_pretrained_tags.py; tests/test_pretrained_tags.py checks it
    return json.loads((Path(__file__).parent / "pretrained_tags.json").read_text())


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered architecture names matching a shell-style ``pattern``; with ``pretrained=True``,
    ``name.tag`` for every known pretrained tag instead."""
    _import_families()
    names = sorted((n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)), key=_natural_key)
    if not pretrained:
        return names
    return [f"{n}.{t}" for n in names for t in _REGISTRY[n].tags]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def all_entries() -> Mapping[str, ModelEntry]:
    _import_families()
    return dict(_REGISTRY)


def _import_families() -> None:
    # Families register themselves on import; importing here keeps `registry` free of cycles.
    import vision_ft.models  # noqa: F401
