"""Classification metrics on host arrays: the numbers a medical-imaging paper reports."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, softmax
from scipy.stats import rankdata


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC by the Mann-Whitney statistic, ties counted half; NaN with one class only."""
    positives = labels.astype(bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC of class 1, or the macro average of one-vs-rest AUCs for more classes."""
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    aucs = [binary_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, hits = scores[order], labels[order].astype(bool)
    distinct = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    tps, fps = np.cumsum(hits)[distinct], np.cumsum(~hits)[distinct]
    tpr = np.r_[0.0, tps / max(hits.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~hits).sum(), 1)]
    return fpr, tpr


def classification_metrics(
    labels: np.ndarray, logits: np.ndarray, class_weights: np.ndarray | None = None
) -> dict:
    """loss, accuracy, balanced accuracy, macro-F1, ROC-AUC and the confusion matrix."""
    labels = np.asarray(labels, np.int64)
    logits = np.asarray(logits, np.float64)
    num_classes = logits.shape[1]
    nll = -log_softmax(logits, axis=1)[np.arange(len(labels)), labels]
    weights = np.ones(len(labels)) if class_weights is None else np.asarray(class_weights)[labels]
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    support, predicted, correct = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)
    present = support > 0
    recall = np.divide(correct, support, out=np.zeros(num_classes), where=present)
    precision = np.divide(correct, predicted, out=np.zeros(num_classes), where=predicted > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=precision + recall > 0
    )
    # argmax takes a NaN row's first NaN for its class: a diverged model would score a finite
    # accuracy, and select_metric accuracy could keep it as best
    decided = len(labels) > 0 and not np.isnan(logits).any()
    nan = float("nan")
    return {
        "loss": float((nll * weights).sum() / weights.sum()) if len(labels) else nan,
        "accuracy": float(correct.sum() / len(labels)) if decided else nan,
        "balanced_accuracy": float(recall[present].mean()) if decided else nan,
        # sklearn's classes: those in the labels or the predictions; a predicted class no example has
        # scores 0 (it is a mistake), one neither true nor predicted says nothing
        "macro_f1": float(f1[present | (predicted > 0)].mean()) if decided else nan,
        "auc": roc_auc(labels, softmax(logits, axis=1)),
        "confusion_matrix": cm.tolist(),
        "count": int(len(labels)),
    }


def selection_mode(metric: str) -> str:
    """Which way a checkpoint's metric is better: "min" for the loss, "max" for every other."""
    return "min" if metric == "loss" else "max"
