"""The phases of a fit: which parameters each trains, and at which learning rates.

A standard fit is one phase. fastai's ``fine_tune`` is two: the new head alone, then everything with
discriminative rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import optax
from flax import nnx

from vision_ft.train.config import FitConfig
from vision_ft.train.groups import layer_ids, param_paths
from vision_ft.train.optimizer import UpdateWindows, build_optimizer, learning_rate_by_step, warmup_cosine
from vision_ft.train.rules import ParamSetting


@dataclass(frozen=True)
class Phase:
    """A stretch of steps with one set of trainable parameters and one optimizer."""

    name: str
    first_step: int
    last_step: int  # exclusive
    freeze: tuple[str, ...]
    lr: float
    layer_decay: float | None

    @property
    def num_steps(self) -> int:
        return self.last_step - self.first_step


def num_layers(model: nnx.Module) -> int:
    """How many layer-decay groups the model's ``group_matcher`` makes, stem to head."""
    return max(layer_ids(param_paths(model), model.group_matcher()).values()) + 1


def plan_phases(cfg: FitConfig, steps_per_epoch: int, layers: int) -> list[Phase]:
    total = cfg.epochs * steps_per_epoch
    if cfg.recipe == "standard":
        return [Phase("train", 0, total, cfg.freeze, cfg.lr, cfg.layer_decay)]
    # fastai's fine_tune: train the new head alone, then everything with discriminative rates that
    # fall by 100x from the head to the stem (unless layer_decay says otherwise), at half the LR.
    head_steps = cfg.head_epochs * steps_per_epoch
    decay = cfg.layer_decay if cfg.layer_decay is not None else 0.01 ** (1 / max(layers - 1, 1))
    return [
        Phase("head", 0, head_steps, (*cfg.freeze, "backbone"), cfg.lr * cfg.head_lr_mult, None),
        Phase("full", head_steps, total, cfg.freeze, cfg.lr / 2, decay),
    ]


def phase_optimizer(
    cfg: FitConfig, phase: Phase, plan: dict[str, ParamSetting], steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """The phase's optimizer and its learning rate by global step (warmup, then cosine; the
    schedule counts optimizer updates where gradients accumulate over several steps)."""
    windows = update_windows(cfg, steps_per_epoch)
    phase_epochs = phase.num_steps // steps_per_epoch
    schedule = warmup_cosine(
        phase.lr,
        total_steps=max(phase_epochs * windows.updates_per_epoch, 1),
        warmup_steps=warmup_updates(cfg.warmup_epochs, windows.updates_per_epoch),
        min_lr_ratio=cfg.min_lr_ratio,
    )
    tx = build_optimizer(plan, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm, windows=windows)
    rates = learning_rate_by_step(
        schedule, num_steps=phase.num_steps, first_step=phase.first_step, windows=windows
    )
    return tx, rates


def update_windows(cfg: FitConfig, steps_per_epoch: int) -> UpdateWindows:
    return UpdateWindows(steps_per_epoch, cfg.accumulate_steps)


def warmup_updates(warmup_epochs: float, updates_per_epoch: int) -> int:
    """The updates that warm up, as timm counts them (those before ``warmup_epochs x updates``, a
    fraction rounding up); rounded first, so that 0.29 x 100 = 28.999... is 29, not 28."""
    return math.ceil(round(warmup_epochs * updates_per_epoch, 6))
