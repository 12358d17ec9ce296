"""Deterministic batching of in-memory splits: the order is a function of (seed, epoch) only, so
a resumed run sees exactly the batches the interrupted one would have."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vision_ft.data.npz import ArraySplit


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def train_batch(split: ArraySplit, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, ...]:
    """The batch of global ``step``: full batches only (the last partial one is dropped, as timm's
    train loader does), in a fresh seeded order each epoch."""
    steps_per_epoch = len(split) // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    rows = epoch_order(len(split), seed, epoch)[index * batch_size : (index + 1) * batch_size]
    return split.images[rows], split.labels[rows], np.ones(batch_size, np.float32)


def eval_batches(split: ArraySplit, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Every example once, in order; the last batch is padded to full size (static shapes, no
    recompilation) and the number of real examples is returned with it."""
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size]
        labels = split.labels[start : start + batch_size]
        real = len(labels)
        if real < batch_size:
            pad = batch_size - real
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
            labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        yield images, labels, real
