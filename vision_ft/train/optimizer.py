"""The optimizer: AdamW per parameter group via optax.multi_transform, over trainable params only.

Frozen parameters never reach the optimizer (the train step splits them off before taking
gradients), so they carry no optimizer state. Each distinct (LR multiplier, weight decay) pair is
one label of ``optax.multi_transform``, sharing one warmup-cosine schedule scaled by the multiplier.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import optax

from vision_ft.train.rules import ParamSetting


def keypath_to_str(keypath) -> str:
    """Dotted parameter path of a pytree key path into an nnx.State (``.value`` dropped)."""
    parts = [
        str(getattr(k, "key", getattr(k, "idx", "")))
        for k in keypath
        if not isinstance(k, jax.tree_util.GetAttrKey)
    ]
    return ".".join(parts)


def group_label(setting: ParamSetting) -> str:
    return f"lr{setting.lr_scale:.6g}_{'decay' if setting.weight_decay else 'nodecay'}"


def warmup_cosine(
    base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> optax.Schedule:
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else base_lr,
        peak_value=base_lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=base_lr * min_lr_ratio,
    )


def build_optimizer(
    plan: Mapping[str, ParamSetting],
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.05,
    clip_norm: float | None = 1.0,
    accumulate_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW with per-group LR multipliers and decay masks, global-norm clipping first, and
    optional gradient accumulation (``optax.MultiSteps``) around everything."""
    groups = {group_label(s): s for s in plan.values() if s.trainable}

    def make(setting: ParamSetting) -> optax.GradientTransformation:
        return optax.adamw(
            lambda step: schedule(step) * setting.lr_scale,
            weight_decay=weight_decay if setting.weight_decay else 0.0,
        )

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda kp, _: group_label(plan[keypath_to_str(kp)]), params)

    tx = optax.multi_transform({label: make(s) for label, s in groups.items()}, labels)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps)
    return tx
