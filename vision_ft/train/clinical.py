"""The evaluation report a clinical reader asks for, from true labels and predicted probabilities.

A point AUC alone does not say how far it can be trusted, nor how the model behaves at the threshold it
would be deployed at. This module adds a bootstrap confidence interval for the AUC, sensitivity and
specificity at fixed operating points, calibration (ECE and a reliability diagram), per-class figures,
and the list of confidently wrong examples to review by hand.

Undefined numbers (e.g. an AUC when the labels hold one class only) are NaN, never an exception: a report
on a small or skewed test set should still be written.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from vision_ft.train.metrics import binary_auc, confusion_matrix, roc_auc, roc_curve

NAN = float("nan")
MISCLASSIFIED_FIELDS = ("id", "label", "predicted", "loss", "p_label", "p_predicted")
# replicates x examples ranked at once: bounds the bootstrap's memory on large test sets (~32 MB of float64)
_RANK_BLOCK = 4_000_000


def _as_inputs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, classes) with N={len(labels)} labels, got shape {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    return labels, probs


def _stratified_resample(labels: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, N) example indices, each replicate redrawn within every class.

    Columns are grouped by class in the order of ``np.argsort(labels, kind="stable")``, so every replicate
    has the same label at the same column and the positive mask is shared by all rows.
    """
    order = np.argsort(labels, kind="stable")
    blocks = []
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        blocks.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(blocks, axis=1)


def _auc_rows(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of every row of ``scores`` (replicates x examples) against one positive mask."""
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    rank_sums = rankdata(scores, axis=1)[:, positives].sum(axis=1)
    return (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _bootstrap_aucs(
    labels: np.ndarray, probs: np.ndarray, classes: list[int], n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """AUC (mean over ``classes``, each against the rest) of ``n_boot`` stratified replicates.

    Replicates are drawn and ranked a block at a time so memory stays bounded on large test sets; the
    blocks depend only on N, so a seed gives the same replicates whatever the machine.
    """
    rows_per_block = max(1, _RANK_BLOCK // len(labels))
    replicates = []
    for start in range(0, n_boot, rows_per_block):
        idx = _stratified_resample(labels, min(rows_per_block, n_boot - start), rng)
        resampled_labels = labels[idx[0]]
        aucs = [_auc_rows(probs[idx, c], resampled_labels == c) for c in classes]
        replicates.append(np.mean(aucs, axis=0))
    return np.concatenate(replicates)


def bootstrap_auc_ci(
    labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """Percentile-bootstrap interval for the AUC, resampling examples within each class.

    Stratifying keeps every replicate's class balance equal to the test set's, so no replicate lacks a
    class (its AUC would be undefined) and the interval reflects sampling noise, not prevalence noise.
    Binary: AUC of ``probs[:, 1]``; more classes: the macro one-vs-rest AUC, as ``metrics.roc_auc``.
    Replicates are ranked together (row-wise ``rankdata``), with no Python loop over replicates.
    """
    labels, probs = _as_inputs(labels, probs)
    auc = roc_auc(labels, probs) if len(labels) else NAN
    result = {"auc": float(auc), "low": NAN, "high": NAN, "n_boot": int(n_boot), "level": float(level)}
    if np.isnan(auc) or n_boot < 1:
        return result
    candidates = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    # as roc_auc does, classes absent from the labels are left out of the macro average
    classes = [c for c in candidates if 0 < (labels == c).sum() < len(labels)]
    replicates = _bootstrap_aucs(labels, probs, classes, n_boot, np.random.default_rng(seed))
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    result.update(low=float(low), high=float(high))
    return result


def _target_key(kind: str, target: float) -> str:
    text = f"{target:.2f}" if abs(target - round(target, 2)) < 1e-12 else f"{target:g}"
    return f"{kind}_{text}"


def _roc_with_thresholds(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sensitivity, specificity and threshold (positive iff score >= threshold) at every distinct score.

    The first point is threshold +inf: nothing called positive, so a target is always reachable.
    """
    fpr, tpr = roc_curve(labels, scores)
    # roc_curve walks the distinct scores from highest to lowest after its (0, 0) start
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    # back to counts so specificity is tn / negatives exactly, not 1 - fpr off by an ulp
    n_neg = int((~labels).sum())
    true_negatives = n_neg - np.rint(fpr * n_neg)
    return tpr, true_negatives / n_neg, thresholds


def _best_point(primary: np.ndarray, secondary: np.ndarray, feasible: np.ndarray) -> int:
    """Index of the highest ``primary`` among feasible points, ties broken by the highest ``secondary``."""
    candidates = np.flatnonzero(feasible)
    best = candidates[np.lexsort((-secondary[candidates], -primary[candidates]))[0]]
    return int(best)


def operating_points(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    specificities: Sequence[float] = (0.90, 0.95),
    sensitivities: Sequence[float] = (0.90, 0.95),
) -> dict:
    """Best sensitivity at each minimum specificity, and best specificity at each minimum sensitivity.

    A screening test is specified by the error it may not exceed ("specificity at least 0.95"), so this is
    the figure to quote rather than accuracy at 0.5. Exact: every distinct score is tried as a threshold
    (positive iff ``score >= threshold``; +inf means nothing positive). Keys look like
    ``sensitivity_at_specificity_0.90``; values hold sensitivity, specificity and threshold (NaN when the
    labels hold one class only, or where a score is not finite).
    """
    positives = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    # a diverged model's NaN scores have no order to threshold (roc_curve and np.unique also disagree
    # on how many distinct NaNs there are, which misaligned the thresholds with the rates)
    defined = 0 < positives.sum() < len(positives) and bool(np.isfinite(scores).all())
    if defined:
        sens, spec, thresholds = _roc_with_thresholds(positives, scores)
    result = {}
    requests = [("sensitivity_at_specificity", t) for t in specificities]
    requests += [("specificity_at_sensitivity", t) for t in sensitivities]
    for kind, target in requests:
        point = {"sensitivity": NAN, "specificity": NAN, "threshold": NAN, "target": float(target)}
        if defined:
            if kind == "sensitivity_at_specificity":
                # a small tolerance keeps e.g. 9/10 == 0.9 from failing a 0.90 target to rounding
                best = _best_point(sens, spec, spec >= target - 1e-12)
            else:
                best = _best_point(spec, sens, sens >= target - 1e-12)
            point.update(
                sensitivity=float(sens[best]),
                specificity=float(spec[best]),
                threshold=float(thresholds[best]),
            )
        result[_target_key(kind, target)] = point
    return result


def calibration(
    labels: np.ndarray, probs: np.ndarray, *, n_bins: int = 15, predicted: np.ndarray | None = None
) -> dict:
    """Expected calibration error of the top-label confidence over equal-width bins (Guo et al., 2017).

    Bin m covers ((m-1)/M, m/M]; a confidence of exactly 0 falls in the first. Every bin is listed, empty
    ones with count 0 and NaN confidence/accuracy, so the reliability diagram keeps a fixed x axis.
    ``predicted`` overrides the argmax decision where ties are broken otherwise (multi-label's 0.5).
    """
    labels, probs = _as_inputs(labels, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    if predicted is None:
        predicted = probs.argmax(axis=1) if len(labels) else np.zeros(0, np.int64)
    predicted = np.asarray(predicted, np.int64)
    confidence = np.take_along_axis(probs, predicted[:, None], axis=1)[:, 0] if len(labels) else np.zeros(0)
    correct = predicted == labels
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins)
    bins, ece = [], 0.0
    for m in range(n_bins):
        count = int(counts[m])
        conf = conf_sum[m] / count if count else NAN
        acc = hit_sum[m] / count if count else NAN
        if count:
            ece += count / len(labels) * abs(acc - conf)
        bins.append(
            {
                "lower": float(edges[m]),
                "upper": float(edges[m + 1]),
                "count": count,
                "confidence": float(conf),
                "accuracy": float(acc),
            }
        )
    return {"ece": float(ece) if len(labels) else NAN, "n_bins": int(n_bins), "bins": bins}


def plot_reliability(calibration_result: dict, path: Path, title: str) -> None:
    """Accuracy against mean confidence per bin over the diagonal, with how many examples each bin holds.

    The counts panel matters: a large gap in a bin of three examples is noise, in a bin of 300 it is not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration_result["bins"]
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    filled = counts > 0

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    left, acc, conf, w = lower[filled], accuracy[filled], confidence[filled], width[filled]
    top.bar(left, acc, width=w, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    top.bar(
        left,
        conf - acc,
        bottom=acc,
        width=w,
        align="edge",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title} (ECE {calibration_result['ece']:.3f})")
    top.legend(loc="upper left")
    bottom.bar(lower, counts, width=width, align="edge", edgecolor="black", color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else NAN


def per_class_report(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per class, that class against the rest, from the arg-max prediction.

    ``recall`` and ``sensitivity`` are the same number under the names each audience looks for. A ratio
    with a zero denominator (e.g. precision of a class never predicted) is NaN rather than 0, so "never
    happened" is not read as "always wrong".
    """
    labels, probs = _as_inputs(labels, probs)
    num_classes = probs.shape[1]
    cm = (
        confusion_matrix(labels, probs.argmax(axis=1), num_classes)
        if len(labels)
        else np.zeros((num_classes,) * 2)
    )
    total = int(cm.sum())
    rows = []
    for c in range(num_classes):
        tp = int(cm[c, c])
        fn = int(cm[c].sum()) - tp
        fp = int(cm[:, c].sum()) - tp
        tn = total - tp - fn - fp
        recall = _ratio(tp, tp + fn)
        rows.append(
            {
                "class": str(class_names[c]),
                "index": c,
                "support": tp + fn,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": tn,
                "precision": _ratio(tp, tp + fp),
                "recall": recall,
                "sensitivity": recall,
                "specificity": _ratio(tn, tn + fp),
                "f1": _ratio(2 * tp, 2 * tp + fp + fn),
                "auc": binary_auc(labels == c, probs[:, c]) if len(labels) else NAN,
            }
        )
    return rows


def hardest_misclassified(
    ids: Sequence[str], labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *, limit: int = 50
) -> list[dict]:
    """Wrongly predicted examples, most confidently wrong first (highest cross-entropy on the true class).

    These are the cases to open and look at: label errors and systematic failure modes surface here first.
    """
    labels, probs = _as_inputs(labels, probs)
    if len(ids) != len(labels):
        raise ValueError(f"{len(ids)} ids for {len(labels)} labels")
    preds = probs.argmax(axis=1)
    rows_index = np.arange(len(labels))
    p_label = probs[rows_index, labels]
    # clip so a probability of exactly 0 gives a large finite loss, which JSON and CSV can carry
    loss = -np.log(np.clip(p_label, np.finfo(np.float64).tiny, None))
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-loss[wrong], kind="stable")][: max(limit, 0)]
    return [
        {
            "id": str(ids[i]),
            "label": str(class_names[labels[i]]),
            "predicted": str(class_names[preds[i]]),
            "loss": float(loss[i]),
            "p_label": float(p_label[i]),
            "p_predicted": float(probs[i, preds[i]]),
        }
        for i in wrong
    ]


def write_misclassified_csv(
    rows: list[dict], path: Path, fields: Sequence[str] = MISCLASSIFIED_FIELDS
) -> None:
    """Rows of ``hardest_misclassified`` under the header ``id,label,predicted,loss,p_label,p_predicted``
    (or other ``fields``, as multi-label mistakes have).

    The csv module quotes ids holding commas or quotes, so any file name survives the round trip.
    """
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in fields})


def _operating_points_for(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Binary: the positive class's points; more classes: each class against the rest, keyed by name."""
    if probs.shape[1] == 2:
        return operating_points(labels == 1, probs[:, 1])
    return {str(name): operating_points(labels == c, probs[:, c]) for c, name in enumerate(class_names)}


def clinical_report(
    labels: np.ndarray,
    probs: np.ndarray,
    ids: Sequence[str],
    class_names: Sequence[str],
    out_dir: Path,
    *,
    prefix: str = "test",
    seed: int = 0,
) -> dict:
    """Everything above for one evaluated split, as a JSON-ready dict of Python scalars.

    Writes ``{prefix}_reliability.png`` and ``{prefix}_misclassified.csv`` under ``out_dir`` and names
    them in the result. ``operating_points`` holds the positive class's points for binary tasks, and one
    entry per class name (that class against the rest) otherwise.
    """
    labels, probs = _as_inputs(labels, probs)
    if probs.shape[1] != len(class_names):
        raise ValueError(f"probs has {probs.shape[1]} columns for {len(class_names)} class names")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = calibration(labels, probs)
    reliability_png = f"{prefix}_reliability.png"
    plot_reliability(calib, out_dir / reliability_png, f"{prefix} reliability")
    misclassified = hardest_misclassified(ids, labels, probs, class_names)
    misclassified_csv = f"{prefix}_misclassified.csv"
    write_misclassified_csv(misclassified, out_dir / misclassified_csv)
    return {
        "count": int(len(labels)),
        "auc_ci": bootstrap_auc_ci(labels, probs, seed=seed),
        "operating_points": _operating_points_for(labels, probs, class_names),
        "ece": calib["ece"],
        "calibration": calib,
        "per_class": per_class_report(labels, probs, class_names),
        "misclassified_count": int((probs.argmax(axis=1) != labels).sum()),
        "misclassified_csv": misclassified_csv,
        "reliability_png": reliability_png,
    }
