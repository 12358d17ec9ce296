"""Compare a vision-ft model with timm's on the same weights.

timm's model is randomly initialised, then every norm parameter, BatchNorm statistic and any
constant-valued tensor (zero-init residual branches, LayerScale, tokens) is perturbed, so a
mapping bug cannot hide behind an identity default. Its state dict goes through vision-ft's real
loading path as a .safetensors file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx
from safetensors.torch import save_file

import vision_ft

TOLERANCE = 1e-4  # max |delta| relative to the largest |value| of the reference output


def perturbed_timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if key.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif key.endswith("running_mean") or tensor.ndim == 1 or _is_constant(tensor):
                tensor.copy_(
                    0.2 * torch.randn(tensor.shape, generator=gen) + (1.0 if _is_scale(key) else 0.0)
                )
    return model


def _is_scale(key: str) -> bool:
    return key.endswith("weight") or key.endswith("gamma")


def _is_constant(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and bool((tensor == tensor.flatten()[0]).all())


def save_checkpoint(model: torch.nn.Module, directory: Path, name: str = "ckpt") -> Path:
    path = Path(directory) / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def torch_outputs(model: torch.nn.Module, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        t = torch.from_numpy(x_nchw)
        feats = model.forward_features(t)
        return model.forward_head(feats).numpy(), model.forward_head(feats, pre_logits=True).numpy()


def jax_outputs(model, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pre-logits from one jitted forward (eagerly, every op would compile on its own)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        merged = nnx.merge(graphdef, state)
        feats = merged.forward_features(x)
        return merged.forward_head(feats), merged.forward_head(feats, pre_logits=True)

    logits, pre_logits = forward(state, np.transpose(x_nchw, (0, 2, 3, 1)))
    return np.asarray(logits), np.asarray(pre_logits)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


def assert_parity(
    name: str,
    tmp_path: Path,
    *,
    img_size: int,
    batch: int = 2,
    timm_kwargs: dict | None = None,
    ours_kwargs: dict | None = None,
    check_logits: bool = True,
) -> dict[str, float]:
    """Build timm's ``name`` with ``timm_kwargs``, load its weights into vision-ft's ``name`` built
    with ``ours_kwargs`` and compare logits and pre-logit embeddings on one random batch."""
    ref = perturbed_timm_model(name, **(timm_kwargs or {}))
    ckpt = save_checkpoint(ref, tmp_path)
    ours = vision_ft.create_model(
        name, pretrained=str(ckpt), **(timm_kwargs or {} if ours_kwargs is None else ours_kwargs)
    )
    return assert_models_match(
        ref, ours, img_size=img_size, batch=batch, check_logits=check_logits, label=name
    )


def _in_chans(model: torch.nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    raise ValueError("no conv layer")


def assert_models_match(
    ref: torch.nn.Module, ours, *, img_size: int, batch: int = 2, check_logits: bool = True, label: str = ""
) -> dict[str, float]:
    """:func:`assert_parity`'s comparison for two models built elsewhere (a timm model loaded by
    timm's own pretrained path, say), on one random batch with ``ref``'s input channels."""
    in_chans = ref.patch_embed.proj.in_channels if hasattr(ref, "patch_embed") else _in_chans(ref)
    x = np.random.default_rng(0).standard_normal((batch, in_chans, img_size, img_size)).astype(np.float32)
    ref_logits, ref_pre = torch_outputs(ref, x)
    our_logits, our_pre = jax_outputs(ours, x)
    errors = {"pre_logits": relative_error(our_pre, ref_pre)}
    if check_logits:
        errors["logits"] = relative_error(our_logits, ref_logits)
    assert all(e <= TOLERANCE for e in errors.values()), f"{label}: {errors}"
    return errors


def assert_structure_matches(name: str, *, timm_kwargs: dict, ours_kwargs: dict | None = None) -> int:
    """Every tensor of timm's full-size ``name`` maps onto a vision-ft variable of the same shape,
    and every variable is filled, checked on shapes alone: timm's model is built on the meta device
    and ours abstractly, so a 300M-parameter preset costs no memory. Returns the tensor count."""
    import timm

    from vision_ft.models.registry import get_model_entry
    from vision_ft.weights.mapping import match_state_dict, variable_shapes

    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, **timm_kwargs)
    zero = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in ref.state_dict().items()}
    ours = nnx.eval_shape(lambda: vision_ft.create_model(name, **(ours_kwargs or timm_kwargs)))
    entry = get_model_entry(name)
    return len(
        match_state_dict(
            variable_shapes(ours), state, entry.rules, ignore=entry.ignore_keys, source=f"timm {name}"
        )
    )


def register_shortened(monkeypatch, name: str, **config_changes) -> None:
    """For one test, make vision-ft build ``name`` with ``config_changes`` (fewer blocks), as timm
    does when given the same keyword arguments."""
    from functools import partial

    from vision_ft.models import registry

    entry = registry.get_model_entry(name)
    config = dataclasses.replace(entry.build.args[0], **config_changes)
    shortened = dataclasses.replace(entry, build=partial(entry.build.func, config))
    monkeypatch.setitem(registry._REGISTRY, entry.name, shortened)


def assert_pretrained_cfg_matches_timm(name: str, *, every_tag: bool = True) -> None:
    """The registry's default cfg for ``name`` holds timm's values, and its tags are timm's
    (``every_tag=False``: a subset, for families whose port leaves some of timm's checkpoints out)."""
    import timm

    from vision_ft.models.registry import get_model_entry

    entry = get_model_entry(name)
    cfg, ref = entry.default_cfg, timm.models.get_pretrained_cfg(name)
    assert cfg.tag == ref.tag and cfg.hf_hub_id == f"timm/{name}.{ref.tag}"
    assert cfg.input_size == ref.input_size and cfg.interpolation == ref.interpolation
    assert cfg.crop_pct == ref.crop_pct and cfg.num_classes == ref.num_classes
    assert cfg.mean == tuple(ref.mean) and cfg.std == tuple(ref.std)
    assert (cfg.first_conv, cfg.classifier, cfg.license) == (ref.first_conv, ref.classifier, ref.license)
    timm_tags = tuple(n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*"))
    if every_tag:
        assert entry.tags == timm_tags
    else:
        assert set(entry.tags) <= set(timm_tags)
