"""Per-band mean and standard deviation of a split, for data that ImageNet statistics do not fit."""

from __future__ import annotations

import numpy as np

from vision_ft.data.errors import DataError
from vision_ft.data.pipeline import ExampleSplit, Geometry, eval_batches


def band_statistics(
    split: ExampleSplit, geometry: Geometry, *, batch_size: int = 64, threads: int = 4
) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(mean, std, examples used) over every readable example, at the model's input geometry and
    in the [0, 1] scale the pipeline feeds the model."""
    total = total_sq = None
    pixels = examples = 0
    for batch in eval_batches(split, geometry, batch_size=batch_size, threads=threads):
        images = batch["image"][batch["mask"] > 0].astype(np.float64)
        if not len(images):
            continue
        sums, sq = images.sum(axis=(0, 1, 2)), np.square(images).sum(axis=(0, 1, 2))
        total = sums if total is None else total + sums
        total_sq = sq if total_sq is None else total_sq + sq
        pixels += images.shape[0] * images.shape[1] * images.shape[2]
        examples += len(images)
    if not examples:
        raise DataError(f"none of the {len(split)} images could be read to compute band statistics from")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
    std = np.where(std > 1e-8, std, 1.0)  # a constant band is centred, not blown up
    return tuple(float(m) for m in mean), tuple(float(s) for s in std), examples
