"""Multi-label classification: each image may carry any subset of the classes (a CSV label ``a|b``).

The model gives one logit per class, trained with sigmoid binary cross-entropy; a class is predicted
when its probability reaches ``THRESHOLD``. Targets are (N, classes) multi-hot rows. The metrics keep
the names of the single-label ones so reports and checkpoint selection work unchanged:

- ``accuracy``: exact-match (subset) accuracy, as scikit-learn's ``accuracy_score`` on multi-label data;
- ``balanced_accuracy``: the mean over classes of (sensitivity + specificity) / 2;
- ``macro_f1`` / ``micro_f1``; ``hamming_accuracy``: the fraction of (image, class) decisions right;
- ``auc``: the macro mean of per-class ROC-AUCs (classes with both outcomes present);
- ``map``: the macro mean of per-class average precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.special import expit, log_expit

from vision_ft.train.clinical import (
    bootstrap_auc_ci,
    calibration,
    operating_points,
    plot_reliability,
    write_misclassified_csv,
)
from vision_ft.train.metrics import binary_auc

THRESHOLD = 0.5
MISTAKE_FIELDS = ("id", "class", "label", "p_class", "loss")


def as_multi_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot rows as they are, or class indices (-1: none) turned into multi-hot rows."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels
    rows = np.zeros((len(labels), num_classes), np.int64)
    known = labels >= 0
    rows[np.flatnonzero(known), labels[known]] = 1
    return rows


def positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per-class weight of positives, negatives / positives (PyTorch's ``pos_weight``), so a rare
    finding counts as much as its absence; 1 for a class with no positives or no negatives."""
    targets = np.asarray(targets, np.float64)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    ok = (positives > 0) & (negatives > 0)
    return np.where(ok, negatives / np.maximum(positives, 1), 1.0).astype(np.float32)


def binary_cross_entropy(
    targets: np.ndarray, logits: np.ndarray, pos_weight: np.ndarray | None = None
) -> np.ndarray:
    """Per-image sigmoid cross-entropy, averaged over classes (timm's BinaryCrossEntropy mean)."""
    targets = np.asarray(targets, np.float64)
    logits = np.asarray(logits, np.float64)
    pos = np.ones(targets.shape[1]) if pos_weight is None else np.asarray(pos_weight, np.float64)
    per_class = -(pos * targets * log_expit(logits) + (1 - targets) * log_expit(-logits))
    return per_class.mean(axis=1)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall step curve, sum of (R_n - R_{n-1}) P_n over distinct
    thresholds (scikit-learn's definition; tied scores form one step). NaN with no positives."""
    positives = np.asarray(labels).astype(bool)
    if not positives.any() or np.isnan(scores).any():  # NaNs have no order to step through
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores, hits = np.asarray(scores)[order], positives[order]
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
    tps = np.cumsum(hits)[distinct]
    precision = tps / (distinct + 1)
    recall_steps = np.diff(np.r_[0, tps]) / positives.sum()
    return float((recall_steps * precision).sum())


def _safe_mean(values: list[float]) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def multilabel_metrics(targets: np.ndarray, logits: np.ndarray, pos_weight: np.ndarray | None = None) -> dict:
    """The multi-label counterpart of ``metrics.classification_metrics`` (see the module docstring);
    ``per_class`` holds each class's support, AUC, AP and confusion counts at ``THRESHOLD``."""
    targets = np.asarray(targets).astype(bool)
    logits = np.asarray(logits, np.float64)
    n, num_classes = targets.shape
    probs = expit(logits)
    preds = probs >= THRESHOLD
    tp = (preds & targets).sum(axis=0)
    fp = (preds & ~targets).sum(axis=0)
    fn = (~preds & targets).sum(axis=0)
    tn = n - tp - fp - fn
    sensitivity = np.divide(tp, tp + fn, out=np.full(num_classes, np.nan), where=tp + fn > 0)
    specificity = np.divide(tn, tn + fp, out=np.full(num_classes, np.nan), where=tn + fp > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(num_classes), where=2 * tp + fp + fn > 0)
    aucs = [binary_auc(targets[:, c], probs[:, c]) for c in range(num_classes)]
    aps = [average_precision(targets[:, c], probs[:, c]) for c in range(num_classes)]
    scored = targets.any(axis=0) | preds.any(axis=0)
    # a NaN probability is no decision (it compares as negative) and no rank: a diverged model's
    # summaries are NaN, never finite scores select_metric could keep it by
    nan = float("nan")
    decided = n > 0 and not np.isnan(logits).any()
    return {
        "loss": float(binary_cross_entropy(targets, logits, pos_weight).mean()) if n else nan,
        "accuracy": float((preds == targets).all(axis=1).mean()) if decided else nan,
        "balanced_accuracy": _safe_mean(list((sensitivity + specificity) / 2)) if decided else nan,
        # over the classes true or predicted somewhere: a class predicted where no example has it
        # scores 0; sklearn also counts a class neither true nor predicted, as 0
        "macro_f1": float(f1[scored].mean()) if decided and scored.any() else nan,
        "micro_f1": float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)) if decided else nan,
        "hamming_accuracy": float((preds == targets).mean()) if decided else nan,
        "auc": _safe_mean(aucs) if decided else nan,
        "map": _safe_mean(aps) if decided else nan,
        "per_class": [
            {
                "support": int(targets[:, c].sum()),
                "auc": aucs[c],
                "average_precision": aps[c],
                "tp": int(tp[c]),
                "fp": int(fp[c]),
                "fn": int(fn[c]),
                "tn": int(tn[c]),
            }
            for c in range(num_classes)
        ],  # fmt: skip
        "count": int(n),
    }


def hardest_mistakes(
    ids: Sequence[str], targets: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *, limit: int = 50
) -> list[dict]:
    """The wrong (image, class) decisions at ``THRESHOLD`` with the highest cross-entropy."""
    targets = np.asarray(targets).astype(bool)
    probs = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
    loss = -np.where(targets, np.log(probs), np.log1p(-probs))
    rows, cols = np.nonzero((probs >= THRESHOLD) != targets)
    order = np.argsort(-loss[rows, cols], kind="stable")[:limit]
    return [
        {"id": ids[r], "class": class_names[c], "label": int(targets[r, c]), "p_class": float(probs[r, c]),
         "loss": float(loss[r, c])}
        for r, c in zip(rows[order], cols[order], strict=True)
    ]  # fmt: skip


def multilabel_clinical_report(
    targets: np.ndarray,
    probs: np.ndarray,
    ids: Sequence[str],
    class_names: Sequence[str],
    out_dir: Path,
    *,
    prefix: str = "test",
    seed: int = 0,
) -> dict:
    """Per class: the bootstrap AUC interval and the operating points; calibration pooled over every
    (image, class) probability. Writes ``{prefix}_reliability.png`` and ``{prefix}_mistakes.csv``."""
    targets = np.asarray(targets).astype(bool)
    probs = np.asarray(probs, np.float64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class = {}
    for c, name in enumerate(class_names):
        two_column = np.stack([1 - probs[:, c], probs[:, c]], axis=1)
        per_class[str(name)] = {
            "support": int(targets[:, c].sum()),
            "auc_ci": bootstrap_auc_ci(targets[:, c].astype(np.int64), two_column, seed=seed),
            "operating_points": operating_points(targets[:, c], probs[:, c]),
        }
    flat = probs.reshape(-1)
    calib = calibration(
        targets.reshape(-1).astype(np.int64),
        np.stack([1 - flat, flat], axis=1),
        predicted=flat >= THRESHOLD,  # decided as the metrics decide: a tie at 0.5 is positive
    )
    reliability_png = f"{prefix}_reliability.png"
    plot_reliability(calib, out_dir / reliability_png, f"{prefix} reliability (every class)")
    mistakes = hardest_mistakes(ids, targets, probs, class_names)
    mistakes_csv = f"{prefix}_mistakes.csv"
    write_misclassified_csv(mistakes, out_dir / mistakes_csv, MISTAKE_FIELDS)
    return {
        "count": int(len(targets)),
        "per_class": per_class,
        "ece": calib["ece"],
        "calibration": calib,
        "mistake_count": int(((probs >= THRESHOLD) != targets).sum()),
        "mistakes_csv": mistakes_csv,
        "reliability_png": reliability_png,
    }
