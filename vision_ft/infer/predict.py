"""What ``predict`` reads (a file, a folder, or a --data spec) and the CSV it writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax

from vision_ft.data.errors import DataError
from vision_ft.data.files import FileSplit
from vision_ft.data.folder import image_files
from vision_ft.data.pipeline import ExampleSplit
from vision_ft.data.records import Record
from vision_ft.data.sources import KINDS, DataOptions, load_dataset
from vision_ft.infer.evaluate import check_split_as_run, empty_split
from vision_ft.train.multilabel import THRESHOLD
from vision_ft.train.run_dir import read_run_config, unnamed_classes


def resolve_input(
    text: str, options: DataOptions, split: str | None, run_dir: Path | None = None
) -> tuple[ExampleSplit, tuple[str, ...] | None, dict[str, str]]:
    """(examples, the names of their label indices, the files of the split left out while the data
    was read): one image file, every image under a folder (unlabelled: None), or a split of a --data
    spec (``split`` defaults to test, else val, else train). The data's own names: a folder of some
    of the run's classes indexes them otherwise. A spec naming the data of the run in ``run_dir``
    must still split as the run did."""
    kind = text.partition(":")[0]
    is_spec = kind in KINDS and ":" in text
    if split is not None and not is_spec:
        raise DataError(f"--split is for a --data spec; --input {text} is a file or folder")
    if is_spec:
        dataset = load_dataset(text, options)
        if run_dir is not None:
            check_split_as_run(Path(run_dir), read_run_config(run_dir), dataset, text)
        name = split or next(s for s in ("test", "val", "train") if s in dataset.splits)
        if name not in dataset.splits:
            raise DataError(f"--split {name}: {text} has splits {', '.join(dataset.splits)}")
        if not len(dataset.splits[name]):
            raise empty_split(text, name)
        return dataset.splits[name], tuple(dataset.class_names), dataset.skipped_from(name)
    path = Path(text).expanduser()
    if path.is_file():
        return FileSplit([Record(str(path.absolute()), -1)], window=options.window), None, {}
    if path.is_dir():
        # as the folder: source lists them (DICOM by its marker, symlinked folders, no hidden ones)
        files = image_files(path.absolute())
        if not files:
            raise DataError(f"--input {path}: no image files in this folder")
        return FileSplit([Record(f, -1) for f in files], window=options.window), None, {}
    raise DataError(f"--input {text}: no such file or folder, and not a npz:/folder:/csv:/tfds: spec")


def named_alike(
    label_names: tuple[str, ...] | None, class_names: tuple[str, ...]
) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """(names of the label column, names of the predictions): where one side is unnamed ("class 0",
    from an npz: file) and the class counts agree, both take the other side's names, matched by
    position as eval matches them, so that a label and its prediction read alike. Otherwise as given
    (a folder of some of the run's classes numbers them otherwise)."""
    if label_names is None or len(label_names) != len(class_names):
        return label_names, class_names
    if unnamed_classes(label_names):
        return class_names, class_names
    if unnamed_classes(class_names):
        return label_names, label_names
    return label_names, class_names


def write_predictions(
    path: Path,
    ids: list[str],
    logits: np.ndarray,
    class_names: tuple[str, ...],
    *,
    labels: np.ndarray | None = None,
    label_names: tuple[str, ...] | None = None,
    top_k: int = 3,
    multi_label: bool = False,
) -> None:
    """One row per image: path, [label], prediction, a probability column per class, and the top-k
    as ``class:probability`` joined by ``|``. Multi-label runs give each class its own sigmoid
    probability and predict every class at or above ``THRESHOLD``, joined by ``|`` (labels likewise).
    ``label_names`` name the label indices (the data's classes; default ``class_names``). Refuses
    to overwrite an existing file, and writes nothing unless every row can be written."""
    if path.exists():
        raise DataError(f"--output {path} exists; not overwriting it")
    logits = np.asarray(logits, np.float64)
    probs = expit(logits) if multi_label else softmax(logits, axis=1)
    top_k = min(top_k, len(class_names))
    header = ["path", *(["label"] if labels is not None else []), "predicted"]
    header += [f"p_{name}" for name in class_names] + [f"top{top_k}"]
    rows = []
    for i, example_id in enumerate(ids):
        order = np.argsort(-probs[i])[:top_k]
        row = [example_id]
        if labels is not None:
            row.append(_label_text(labels[i], label_names or class_names))
        if multi_label:
            row.append("|".join(class_names[c] for c in np.flatnonzero(probs[i] >= THRESHOLD)))
        else:
            row.append(class_names[order[0]])
        row += [f"{p:.6f}" for p in probs[i]]
        row.append("|".join(f"{class_names[c]}:{probs[i, c]:.6f}" for c in order))
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _label_text(label: np.ndarray, class_names: tuple[str, ...]) -> str:
    """A class index (-1: unknown) or a multi-hot row, as class names."""
    label = np.asarray(label)
    if label.ndim == 1:
        return "|".join(class_names[c] for c in np.flatnonzero(label))
    return class_names[int(label)] if label >= 0 else ""
