"""What a run writes under ``--output``: metrics.jsonl, TensorBoard events, PNG plots, final.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from vision_ft.train.metrics import roc_curve
from vision_ft.train.run_dir import RunDirError

SCALARS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "auc")


def strict_json(value):
    """``value`` with NaN and infinities as None (JSON null) and numpy scalars as Python ones:
    ``json.dumps`` would otherwise write NaN, which strict JSON readers (jq, JavaScript) reject."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def json_text(payload, *, indent: int | None = None) -> str:
    return json.dumps(strict_json(payload), indent=indent, allow_nan=False)


def summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, imported without torch. tensorboardX imports torch where it
    is installed, only to accept torch tensors; a run never passes one, and the import cost every
    `fit` 3-8 s and about 470 MB. Torch stays hidden while tensorboardX loads (unless it is loaded
    already, by the caller's own code)."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


_RECORD_KEYS = (("epoch", int), ("step", int), ("split", str))  # in every record of a fit


class MetricsLog:
    """Appends one JSON object per evaluation to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, directory: Path, *, resume_step: int | None = None, write: bool = True):
        self.path = directory / "metrics.jsonl"
        self.write = write  # other processes of a multi-process run keep the records in memory only
        records = self.read(self.path) if resume_step is not None else []
        # on resume, forget what was logged after the checkpoint: those steps run again; and the test
        # record, which the run's end writes again (it may have died after writing it)
        self.records = [r for r in records if r["step"] <= (resume_step or 0) and r["split"] != "test"]
        self.writer = None
        if write:  # replaced whole: a kill while it is written leaves the old log
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json_text(r) + "\n" for r in self.records))
            tmp.replace(self.path)
            writer_class = summary_writer_class()
            # TensorBoard hides earlier events from purge_step on: those logged at the checkpoint's
            # own step stay (the resumed run goes on from the step after it)
            purge_step = None if resume_step is None else resume_step + 1
            self.writer = writer_class(str(directory / "tensorboard"), purge_step=purge_step)

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise RunDirError(f"{path}: not a fit's metrics log (not UTF-8 text)") from None
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            # a process killed while appending leaves its last record cut short; that evaluation came
            # after the latest checkpoint, which is saved once the record is complete, so it runs again
            lines.pop()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                damaged = f"{path}, line {number}: not a JSON record; the metrics log is damaged"
                raise RunDirError(damaged) from None
            if not isinstance(record, dict) or not all(
                isinstance(record.get(key), kind) for key, kind in _RECORD_KEYS
            ):
                raise RunDirError(f"{path}, line {number}: not a fit's record (epoch, step and split)")
            records.append(record)
        # undefined metrics were written as null; in memory they are NaN again, as when computed
        return [{k: float("nan") if v is None else v for k, v in r.items()} for r in records]

    def log(self, split: str, epoch: int, step: int, metrics: dict) -> dict:
        record = {"epoch": epoch, "step": step, "split": split, **metrics}
        self.records.append(record)
        if not self.write:
            return record
        with open(self.path, "a") as f:
            f.write(json_text(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, int | float) and np.isfinite(value):
                self.writer.add_scalar(f"{split}/{key}", value, step)
        self.writer.flush()
        return record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_learning_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = [r for r in records if r["split"] == split]
        if rows:
            axes[0].plot([r["epoch"] for r in rows], [r["loss"] for r in rows], style, label=f"{split} loss")
    for key in ("auc", "accuracy", "balanced_accuracy"):
        rows = [r for r in records if r["split"] == "val" and key in r]
        if rows:
            axes[1].plot([r["epoch"] for r in rows], [r[key] for r in rows], "o-", label=f"val {key}")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.lines:  # a run stopped before its first evaluation has no validation curves
            ax.legend()
    axes[1].set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_LARGEST_PLOT_INCHES = 20.0  # 2000 pixels at the plots' 100 dpi
_MOST_CLASSES_LABELLED = 30  # beyond, class names, counts and legends are unreadable


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix)
    # bounded: drawn at 1.2 inches a class with every count written, 600 classes ran out of memory
    side = min(1.2 * len(cm) + 2.5, _LARGEST_PLOT_INCHES)
    fig, ax = plt.subplots(figsize=(side, side - 0.5))
    ax.imshow(cm, cmap="Blues")
    if len(cm) <= _MOST_CLASSES_LABELLED:
        for i in range(len(cm)):
            for j in range(len(cm)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="black")
        ax.set_xticks(range(len(cm)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(cm)), class_names)
    ax.set_xlabel("predicted" if len(cm) <= _MOST_CLASSES_LABELLED else "predicted class index")
    ax.set_ylabel("true" if len(cm) <= _MOST_CLASSES_LABELLED else "true class index")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """One curve per class against the rest (the positive class only for binary tasks); ``labels``
    are class indices, or multi-hot rows for multi-label data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    multi_hot = labels.ndim == 2
    classes = [1] if probs.shape[1] == 2 and not multi_hot else range(probs.shape[1])
    for c in classes:
        positives = labels[:, c].astype(bool) if multi_hot else labels == c
        if 0 < positives.sum() < len(labels):
            fpr, tpr = roc_curve(positives, probs[:, c])
            ax.plot(fpr, tpr, label=class_names[c])
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if len(ax.lines) <= _MOST_CLASSES_LABELLED + 1:  # a legend of hundreds would cover the plot
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json_text(payload, indent=2) + "\n")
    tmp.replace(path)
