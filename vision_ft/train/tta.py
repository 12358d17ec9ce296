"""Test-time augmentation: the views of a batch whose outputs an evaluation averages.

The views mirror what training varied: the image, its mirror (``flip``), and each of those moved by
``shift`` of the shorter side up, down, left and right, reflect-padded as training's translation
is. Chosen for BreastMNIST on checkpoints of the cross-validation (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def reflect_padded(images: jax.Array, pad: int) -> jax.Array:
    """``images`` (N, H, W, C) reflect-padded by ``pad`` on each spatial side: the canvas that training's
    random translation and the shifted views both crop from, so that no view shows a border training
    never saw."""
    return jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def augmented_views(images: jax.Array, *, flip: bool, shift: float) -> list[jax.Array]:
    """``images`` (N, H, W, C) and its augmented views, in a fixed order (the batch first)."""
    h, w = images.shape[1:3]
    bases = [images, images[:, :, ::-1]] if flip else [images]
    pad = int(round(shift * min(h, w)))
    if pad == 0:
        return bases
    views = list(bases)
    for base in bases:
        padded = reflect_padded(base, pad)
        for dy, dx in ((-pad, 0), (pad, 0), (0, -pad), (0, pad)):
            views.append(padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w])
    return views


def averaged_over_views(
    fn: Callable[[jax.Array], jax.Array], images: jax.Array, *, flip: bool, shift: float
) -> jax.Array:
    """The float32 mean of ``fn`` over the views of ``images`` (just ``fn(images)`` without TTA)."""
    outputs = [fn(view).astype(jnp.float32) for view in augmented_views(images, flip=flip, shift=shift)]
    return sum(outputs[1:], outputs[0]) / len(outputs)
