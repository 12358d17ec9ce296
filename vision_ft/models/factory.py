"""``create_model``: build a registered architecture and load pretrained weights with timm's rules."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from vision_ft.models.registry import ModelEntry, PretrainedCfg, get_model_entry
from vision_ft.weights.adapt import adapt_input_conv, adapt_norm_stats
from vision_ft.weights.mapping import load_state_dict_into
from vision_ft.weights.sources import WeightSource, resolve_source

log = logging.getLogger("vision_ft.models")


def create_model(
    name: str,
    *,
    pretrained: bool | str | Path = False,
    num_classes: int | None = None,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Create ``name`` (a timm architecture, optionally ``name.tag``) as an NNX module taking
    normalized NHWC float inputs.

    ``pretrained`` is ``False``, ``True`` (the default tag; offline packages first where they exist),
    ``"hf-hub:timm/<name>.<tag>"`` or a local ``.safetensors``/``.pth``/``.bin`` file. A checkpoint
    classifier is dropped when ``num_classes`` differs from it; ``num_classes=None`` keeps the
    checkpoint's classes. ``num_classes=0`` builds a model without classifier.
    """
    entry = get_model_entry(name)
    source = resolve_source(pretrained, entry.name, entry.default_cfg.hf_hub_id)
    cfg = entry.default_cfg
    if source is not None and source.cfg_overrides:
        cfg = dataclasses.replace(cfg, **source.cfg_overrides)
    if num_classes is None:
        num_classes = _checkpoint_classes(source, cfg)
    size = _resolve_img_size(img_size, cfg)
    model = entry.build(
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=size,
        drop_path_rate=drop_path_rate,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )
    model.pretrained_cfg = dataclasses.replace(
        cfg,
        input_size=(in_chans, *size),
        mean=adapt_norm_stats(in_chans, cfg.mean),
        std=adapt_norm_stats(in_chans, cfg.std),
        num_classes=num_classes,
    )
    if source is not None:
        load_pretrained(model, entry, source, num_classes=num_classes, in_chans=in_chans)
        log.info("%s: loaded weights from %s", entry.name, source.description)
    return model


def load_pretrained(
    model: nnx.Module, entry: ModelEntry, source: WeightSource, *, num_classes: int, in_chans: int
) -> None:
    """Apply timm's load-time adaptations, then map every tensor into ``model``."""
    state = dict(source.state_dict)
    if entry.filter_state_dict is not None:
        state = entry.filter_state_dict(state, model)
    cfg = entry.default_cfg
    first_conv = f"{cfg.first_conv}.weight"
    if first_conv in state and state[first_conv].shape[1] != in_chans:
        state[first_conv] = adapt_input_conv(in_chans, state[first_conv])
    keep_init = []
    classifier_weight = state.get(f"{cfg.classifier}.weight")
    if classifier_weight is not None and (num_classes == 0 or classifier_weight.shape[0] != num_classes):
        prefix = f"{cfg.classifier}."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        keep_init.append(re.escape(prefix) + ".*")
    load_state_dict_into(
        model,
        state,
        entry.rules,
        ignore=entry.ignore_keys,
        keep_model_init=keep_init,
        source=source.description,
    )


def _checkpoint_classes(source: WeightSource | None, cfg: PretrainedCfg) -> int:
    if source is not None:
        weight = source.state_dict.get(f"{cfg.classifier}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return cfg.num_classes


def _resolve_img_size(img_size: int | tuple[int, int] | None, cfg: PretrainedCfg) -> tuple[int, int]:
    if img_size is None:
        return tuple(cfg.input_size[1:])
    if isinstance(img_size, int):
        return (img_size, img_size)
    return tuple(img_size)
