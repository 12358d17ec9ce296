"""Per-class loss weights for imbalanced data (``class_weights: auto``)."""

from __future__ import annotations

import numpy as np

from vision_ft.train.multilabel import positive_weights


def class_weights_for(mode: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse class frequencies (``auto``) or ones (``none``); for multi-hot labels, each class's
    weight of positives (negatives / positives)."""
    if mode == "none":
        return np.ones(num_classes, np.float32)
    if labels.ndim == 2:
        return positive_weights(labels)
    counts = class_counts(labels, num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Examples of each class: positives per column of multi-hot labels, else labels per class."""
    if labels.ndim == 2:
        return np.asarray(labels).sum(axis=0)
    # unlabelled records (-1 in some TFDS catalogues) are left out of training, so out of the counts
    known = labels[(labels >= 0) & (labels < num_classes)]
    return np.bincount(known.astype(np.int64), minlength=num_classes)
