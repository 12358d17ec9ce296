"""The optimizer: AdamW per parameter group via optax.multi_transform, over trainable params only.

Frozen parameters never reach the optimizer (the train step splits them off before taking
gradients), so they carry no optimizer state. Each distinct (LR multiplier, weight decay) pair is
one label of ``optax.multi_transform``. The schedule stays outside the optimizer: the train step
takes each step's learning rate as an argument and scales the updates by it, so neither the peak
rate, the warmup nor the run's length is compiled into the step, and a run with another ``--lr`` or
``--epochs`` loads the compiled step from the persistent cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
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


@dataclass(frozen=True)
class UpdateWindows:
    """Which train steps make one optimizer update under gradient accumulation: windows of
    ``accumulate_steps`` steps that restart with every epoch, the last one short where the epoch's
    steps do not divide evenly. As timm's train loop does, an epoch's leftover steps make an update of
    their own, never carried into the next epoch nor dropped. Steps count from the start of training
    or of a phase: both are epoch boundaries."""

    steps_per_epoch: int
    accumulate_steps: int = 1

    @property
    def updates_per_epoch(self) -> int:
        return -(-self.steps_per_epoch // self.accumulate_steps)

    def update_index(self, step: int) -> int:
        """The 0-based optimizer update that train step ``step`` contributes to."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch * self.updates_per_epoch + within // self.accumulate_steps

    def closes_window(self, step: int) -> bool:
        """Whether the optimizer updates the weights at train step ``step``."""
        within = step % self.steps_per_epoch
        return (within + 1) % self.accumulate_steps == 0 or within == self.steps_per_epoch - 1

    def window_steps(self, update: jax.Array) -> jax.Array:
        """How many steps update ``update`` averages: ``optax.MultiSteps``' every_k_schedule."""
        short = self.steps_per_epoch % self.accumulate_steps
        if not short:
            return jnp.asarray(self.accumulate_steps, jnp.int32)
        last_of_epoch = update % self.updates_per_epoch == self.updates_per_epoch - 1
        return jnp.where(last_of_epoch, short, self.accumulate_steps).astype(jnp.int32)


def learning_rate_by_step(
    schedule: optax.Schedule, *, num_steps: int, first_step: int = 0, windows: UpdateWindows | None = None
) -> Callable[[int], float]:
    """The learning rate of each global train step from ``first_step`` on, read from a table made
    once: ``schedule`` counts optimizer updates, which with gradient accumulation take several steps
    each (``windows``). On the host, so the loop never waits for the device to learn it."""
    windows = windows or UpdateWindows(max(num_steps, 1))
    num_updates = max(windows.update_index(max(num_steps - 1, 0)) + 1, 1)

    def learning_rate_table() -> jax.Array:
        return jax.vmap(schedule)(jnp.arange(num_updates))

    # one small program (its own entry in the persistent cache) instead of one per step
    table = np.asarray(jax.jit(learning_rate_table)(), np.float32)

    def at(step: int) -> float:
        return float(table[min(windows.update_index(step - first_step), num_updates - 1)])

    return at


def build_optimizer(
    plan: Mapping[str, ParamSetting],
    *,
    weight_decay: float = 0.05,
    clip_norm: float | None = 1.0,
    windows: UpdateWindows | None = None,
) -> optax.GradientTransformation:
    """AdamW with per-group LR multipliers and decay masks, global-norm clipping first, and
    optional gradient accumulation over ``windows`` (``optax.MultiSteps``) around everything. Its
    updates are for a learning rate of 1 (times the group's multiplier): the train step scales them
    by the step's rate, as optax's own ``scale_by_learning_rate`` would at the end of the chain."""
    groups = {group_label(s): s for s in plan.values() if s.trainable}

    def make(setting: ParamSetting) -> optax.GradientTransformation:
        return optax.adamw(setting.lr_scale, weight_decay=weight_decay if setting.weight_decay else 0.0)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda kp, _: group_label(plan[keypath_to_str(kp)]), params)

    tx = optax.multi_transform({label: make(s) for label, s in groups.items()}, labels)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if windows is not None and windows.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=windows.window_steps)
    return tx
