"""A fit's evaluation of a split: predictions in order, unusable examples, metrics and test reports."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax

from vision_ft.data.errors import BadImageError
from vision_ft.data.pipeline import Geometry, sharded_eval_batches, unusable_reason
from vision_ft.train import report
from vision_ft.train.clinical import clinical_report
from vision_ft.train.distributed import is_primary
from vision_ft.train.metrics import classification_metrics, selection_mode
from vision_ft.train.multilabel import multilabel_clinical_report, multilabel_metrics
from vision_ft.train.step import Trainer

log = logging.getLogger("vision_ft.fit")

PUBLIC_METRICS = (
    "epoch", "step", "loss", "accuracy", "balanced_accuracy", "macro_f1", "auc", "confusion_matrix",
    "micro_f1", "hamming_accuracy", "map", "per_class",
)  # fmt: skip


class BadExamples:
    """The unusable examples met so far, id -> reason; with ``on_bad_image: fail`` the first stops
    the run instead."""

    def __init__(self, known: dict[str, str], on_bad_image: str):
        # ``known``: left out while the data was indexed (a CSV row naming a missing file, an unknown
        # label), so no batch will ever meet them; they are judged as the batches' unusable images are
        if known and on_bad_image == "fail":
            path, reason = next(iter(known.items()))
            raise BadImageError(path, f"{reason} (on_bad_image: fail)")
        for path, reason in known.items() if is_primary() else ():  # every process indexed the same
            log.warning("skipping unusable example %s: %s", path, reason)
        self.reasons = dict(known)
        self.on_bad_image = on_bad_image

    def note(self, split, batch: dict, geometry: Geometry) -> None:
        for row in batch["row"][batch["bad"] > 0]:
            path = split.example_id(int(row))
            if path in self.reasons:
                continue
            reason = unusable_reason(split, int(row), geometry)
            if self.on_bad_image == "fail":
                raise BadImageError(path, f"{reason} (on_bad_image: fail)")
            log.warning("skipping unusable example %s: %s", path, reason)
            self.reasons[path] = reason


def predict_split(
    trainer: Trainer, split, geometry: Geometry, bad: BadExamples, *, batch_size: int, threads: int,
    workers: int, shifted: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """Labels, logits and ids of every readable example of ``split``, in order; the last batch is
    padded and masked, so the eval step never recompiles (``shifted``: see ``Trainer.predict``)."""
    labels, outputs, ids = [], [], []
    batches = sharded_eval_batches(
        split, geometry, trainer.batch_sharding, batch_size=batch_size, threads=threads, workers=workers
    )
    for images, batch in batches:
        bad.note(split, batch, geometry)
        keep = batch["mask"] > 0
        logits = np.asarray(trainer.predict(images, shifted=shifted))
        labels.append(batch["label"][keep])
        outputs.append(logits[keep])
        ids += [split.example_id(int(r)) for r in batch["row"][keep]]
    return np.concatenate(labels).astype(np.int64), np.concatenate(outputs), ids


def split_metrics(
    labels: np.ndarray, logits: np.ndarray, class_weights: np.ndarray, *, multi_label: bool
) -> dict:
    if multi_label:
        return multilabel_metrics(labels, logits, class_weights)
    return classification_metrics(labels, logits, class_weights)


def worst_selection_score(metric: str) -> float:
    """What any first evaluation improves on."""
    return math.inf if selection_mode(metric) == "min" else -math.inf


def improves_selection(score: float, best: float, metric: str) -> bool:
    return score < best if selection_mode(metric) == "min" else score > best


def selection_score(metrics: dict, metric: str) -> float:
    """The value a checkpoint is kept by; an undefined one (AUC of a one-class split) never wins.
    Rounded to float32, as the latest checkpoint keeps the best score: compared in float64, a resumed
    run's rounded-down best made a tie with it a new best (and an uninterrupted run did not)."""
    if metric == "loss":
        return float(np.float32(metrics["loss"]))
    value = metrics[metric]
    return float(np.float32(value)) if np.isfinite(value) else -math.inf


def test_reports(
    labels: np.ndarray, logits: np.ndarray, ids: list[str], test: dict, class_names: list[str], out: Path,
    *, multi_label: bool,
) -> dict:  # fmt: skip
    """Plots of the test split in ``out``, and its clinical report."""
    # in float64, as the metrics compute them: float32 rounds probabilities to 1 once two logits
    # differ by about 17, which would tie scores the metrics rank apart (another AUC)
    logits = np.asarray(logits, np.float64)
    if multi_label:
        probs = expit(logits)
        report.plot_roc(labels, probs, class_names, out / "roc.png", "test ROC")
        return multilabel_clinical_report(labels, probs, ids, class_names, out, prefix="test")
    probs = softmax(logits, axis=-1)
    report.plot_confusion_matrix(test["confusion_matrix"], class_names, out / "confusion_matrix.png", "test")
    report.plot_roc(labels, probs, class_names, out / "roc.png", "test ROC")
    return clinical_report(labels, probs, ids, class_names, out, prefix="test")


def public_metrics(metrics: dict) -> dict:
    """The metrics ``final.json`` reports (not the per-example arrays some carry)."""
    return {k: metrics[k] for k in PUBLIC_METRICS if k in metrics}
