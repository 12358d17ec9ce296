"""``create_model``: build a registered architecture and load pretrained weights with timm's rules."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vision_ft.models.registry import ModelEntry, PretrainedCfg, cfg_for_tag, get_model_entry
from vision_ft.weights.adapt import adapt_input_conv, adapt_norm_stats
from vision_ft.weights.mapping import format_path, match_state_dict, variable_shapes
from vision_ft.weights.sources import WeightSource, resolve_source

log = logging.getLogger("vision_ft.models")

# given the abstractly built model, values for (some of) its variables by path
WeightsFor = Callable[[nnx.Module], Mapping[tuple, np.ndarray | jax.Array]]


def _hub_tag_cfg(entry: ModelEntry, pretrained: object) -> PretrainedCfg | None:
    """The registered pretrained_cfg of ``hf-hub:timm/<name>.<tag>``: the starting point that the
    repo's own config.json (when it can be read) only refines."""
    if not isinstance(pretrained, str):
        return None
    name, _, tag = pretrained.removeprefix("hf-hub:timm/").partition(".")
    if not pretrained.startswith("hf-hub:timm/") or name != entry.name or tag not in entry.tags:
        return None
    return cfg_for_tag(get_model_entry(entry.name), tag)  # the tag's differences from the base's


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
    weights: WeightsFor | None = None,
) -> nnx.Module:
    """Create ``name`` (a timm architecture, optionally ``name.tag``) as an NNX module taking
    normalized NHWC float inputs.

    ``pretrained`` is ``False``, ``True`` (the default tag; offline packages first where they exist),
    ``"hf-hub:timm/<name>.<tag>"`` or a local ``.safetensors``/``.pth``/``.bin`` file. A checkpoint
    classifier is dropped when ``num_classes`` differs from it; ``num_classes=None`` keeps the
    checkpoint's classes. ``num_classes=0`` builds a model without classifier.

    ``weights`` (with ``pretrained=False``) supplies variables' values from elsewhere, an Orbax
    checkpoint say: it gets the model built abstractly and returns arrays by variable path.
    Whatever neither source fills is initialised as usual.
    """
    entry = get_model_entry(name)
    source = resolve_source(pretrained, entry.name, entry.default_cfg.hf_hub_id)
    cfg = _hub_tag_cfg(entry, pretrained) or entry.default_cfg
    if source is not None and source.cfg_overrides:
        cfg = dataclasses.replace(cfg, **source.cfg_overrides)
    if num_classes is None:
        num_classes = _checkpoint_classes(source, cfg, entry.classifier_aliases)
    size = _resolve_img_size(img_size, cfg)

    def construct() -> nnx.Module:
        return entry.build(
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=size,
            drop_path_rate=drop_path_rate,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(params=seed, dropout=seed + 1),
        )

    if weights is not None:
        if source is not None:
            raise ValueError("create_model: give pretrained or weights, not both")
        model = construct_with(construct, weights)
    elif source is not None:

        def from_checkpoint(abstract: nnx.Module) -> dict[tuple, np.ndarray]:
            return checkpoint_arrays(abstract, entry, source, num_classes=num_classes, in_chans=in_chans)

        model = construct_with(construct, from_checkpoint)
        log.info("%s: loaded weights from %s", entry.name, source.description)
    else:
        model = construct()
    model.pretrained_cfg = dataclasses.replace(
        cfg,
        input_size=(in_chans, *size),
        mean=adapt_norm_stats(in_chans, cfg.mean),
        std=adapt_norm_stats(in_chans, cfg.std),
        num_classes=num_classes,
    )
    return model


def construct_with(construct: Callable[[], nnx.Module], weights: WeightsFor) -> nnx.Module:
    """``construct()`` with the variables ``weights`` fills, which are never randomly initialised.

    Eager initialisation compiles one small program per parameter shape (half a minute for an
    EfficientNet-B3 on a CPU). The model is built abstractly instead; only what ``weights`` does
    not fill (a new classifier, the dropout RNG streams) is initialised, in one jitted
    ``construct()`` whose other outputs XLA drops, so those values equal an eager build's.
    """
    abstract = nnx.eval_shape(construct)
    known = weights(abstract)
    graphdef, state = nnx.split(abstract)
    variables = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    fresh_paths = [path for path in variables if path not in known]

    def fresh_values() -> list:
        built = {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(construct()))}
        return [built[path].get_value() for path in fresh_paths]

    fresh = dict(zip(fresh_paths, jax.jit(fresh_values)(), strict=True))
    for path, var in variables.items():
        if path in known:
            expected = var.get_value()
            value = jnp.asarray(known[path], dtype=expected.dtype)
            if value.shape != expected.shape:
                raise ValueError(
                    f"{format_path(path)}: weights give {value.shape}, the model has {expected.shape}"
                )
            var.set_value(value)
        else:
            var.set_value(fresh[path])
    return nnx.merge(graphdef, state)


def checkpoint_arrays(
    model: nnx.Module,
    entry: ModelEntry,
    source: WeightSource,
    *,
    num_classes: int,
    in_chans: int,
) -> dict[tuple, np.ndarray]:
    """Apply timm's load-time adaptations, then map every tensor onto ``model``'s parameters and
    batch statistics (by path; ``model`` may be abstract)."""
    state = dict(source.state_dict)
    if entry.filter_state_dict is not None:
        state = entry.filter_state_dict(state, model)
    cfg = entry.default_cfg
    first_conv = f"{cfg.first_conv}.weight"
    if first_conv in state:
        state[first_conv] = adapt_input_conv(
            in_chans, state[first_conv], name=first_conv, source=source.description
        )
    keep_init = []
    prefix = f"{cfg.classifier}."
    classifier_weight = state.get(f"{prefix}weight")
    if classifier_weight is not None and (num_classes == 0 or classifier_weight.shape[0] != num_classes):
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        keep_init.append(re.escape(prefix) + ".*")
    headless = classifier_weight is None and not any(alias in state for alias in entry.classifier_aliases)
    if headless and num_classes > 0:  # saved without a classifier (DINOv2): a new head, as timm starts
        log.info("%s holds no classifier: a new %d-class head", source.description, num_classes)
        keep_init.append(re.escape(prefix) + ".*")
    return match_state_dict(
        variable_shapes(model),
        state,
        entry.rules,
        ignore=entry.ignore_keys,
        keep_model_init=keep_init,
        model_name=type(model).__name__,
        source=source.description,
    )


def _checkpoint_classes(source: WeightSource | None, cfg: PretrainedCfg, aliases: tuple[str, ...]) -> int:
    if source is not None:
        for key in (f"{cfg.classifier}.weight", *aliases):
            weight = source.state_dict.get(key)
            if weight is not None:
                return int(weight.shape[0])
    return cfg.num_classes


def _resolve_img_size(img_size: int | tuple[int, int] | None, cfg: PretrainedCfg) -> tuple[int, int]:
    if img_size is None:
        return tuple(cfg.input_size[1:])
    if isinstance(img_size, int):
        return (img_size, img_size)
    return tuple(img_size)
