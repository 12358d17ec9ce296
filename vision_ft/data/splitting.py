"""Seeded per-class train/val/test splits, and a CSV that pins a split down so a run can be repeated."""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vision_ft.data.errors import DataError
from vision_ft.data.records import Record

SPLIT_ORDER = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject fractions that would leave no training data, before any files are listed."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        # written as a negated range test so that NaN is rejected too
        if not 0.0 <= value < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 to leave training data, "
            f"got {val_fraction} + {test_fraction}"
        )


def _held_out(count: int, fraction: float) -> int:
    # round half up rather than Python's banker's rounding, so 10 x 0.25 gives 3 on every platform
    return math.floor(count * fraction + 0.5) if fraction > 0 else 0


def _class_shares(count: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of one class's examples go to val and test; at least one always stays in train."""
    n_val, n_test = _held_out(count, val_fraction), _held_out(count, test_fraction)
    excess = n_val + n_test - (count - 1)
    if excess > 0:
        # a tiny class cannot feed every split: the test split gives way first, then val
        from_test = min(excess, n_test)
        n_test -= from_test
        n_val -= excess - from_test
    return n_val, n_test


def stratified_split(
    labels: Sequence[int], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices per split ``train``/``val``/``test``, each class split in the same proportions.

    Stratifying keeps rare classes represented in every split, which a plain shuffle does not. Each
    class is shuffled with ``np.random.default_rng(seed)`` (classes taken in ascending order, so the
    result depends only on the labels and the seed) and gives ``round(n * fraction)`` examples to
    val and test, rounding half up: a class with at least ``1 / fraction`` examples therefore puts at
    least one in that split, and every class keeps at least one training example. A split whose
    fraction is 0 is left out. Indices within each split are sorted, so records keep their listing
    order.
    """
    check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": []}
    if val_fraction > 0:
        parts["val"] = []
    if test_fraction > 0:
        parts["test"] = []
    order = np.argsort(labels, kind="stable")
    _, counts = np.unique(labels, return_counts=True)
    start = 0
    for count in counts:
        members = rng.permutation(order[start : start + count])
        start += count
        n_val, n_test = _class_shares(int(count), val_fraction, test_fraction)
        if "val" in parts:
            parts["val"].append(members[:n_val])
        if "test" in parts:
            parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {
        split: np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)
        for split, chunks in parts.items()
    }


def refuse_empty_held_out(sizes: dict[str, int], spec: str, fractions: dict[str, float]) -> None:
    """Stop a fit before it trains when its val or test split has no examples: it would be evaluated
    after the first epoch or at the end. Where fit draws the split, a class of fewer than
    ``0.5 / fraction`` examples gives it none (``round`` half up)."""
    for split, fraction in fractions.items():
        if sizes.get(split, 1) > 0:
            continue
        hint = ""
        if fraction > 0:
            hint = (
                f": where fit draws it, --{split}-fraction {fraction:g} gives none to a class of fewer "
                f"than {math.ceil(0.5 / fraction - 1e-9)} images; raise it, or set it to 0"
            )
        raise DataError(f"the {split} split of {spec} is empty (no examples){hint}")


def _label_cell(record: Record, class_names: Sequence[str] | None) -> str:
    indices = record.labels or (record.label,)
    if class_names is None:
        return "|".join(str(i) for i in indices)
    return "|".join(class_names[i] for i in indices)


def _path_cell(record_path: str, csv_folder: str, root: Path | None) -> str:
    if root is not None and Path(record_path).is_relative_to(root):
        # relative to the CSV's own folder because that is what index_csv resolves relative paths against
        return os.path.relpath(record_path, csv_folder)
    return record_path


def write_split_file(
    path: Path,
    splits: dict[str, list[Record]],
    root: Path | None,
    *,
    class_names: Sequence[str] | None = None,
) -> None:
    """Write CSV ``path,label,split`` that ``index_csv`` reads back into exactly these records per split.

    A run records its split so that it can be repeated or audited even if the data folder gains files.
    Records under ``root`` are written as paths relative to the CSV's folder (identical to relative to
    ``root`` when the CSV is written into ``root``), so the data and its split file can move together;
    any other record keeps its absolute path; ``root=None`` writes every path absolute.

    Labels are written as ``class_names[i]`` when given, else as the class index; multi-label records
    as ``a|b``. Reading back with ``index_csv(path, classes=class_names)`` reproduces the class indices
    exactly, even for classes with no records or names that would sort differently.
    """
    path = Path(path).expanduser()
    if class_names is not None:
        for name in class_names:
            if "|" in name:
                raise DataError(
                    f"{path}: class name {name!r} contains '|', which a split file reads as two labels"
                )
    csv_folder = str(path.absolute().parent.resolve())  # as index_csv reads it back, even through a link
    root = Path(root).expanduser().resolve() if root is not None else None
    ordered = [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for split in ordered:
            for record in splits[split]:
                writer.writerow(
                    [_path_cell(record.path, csv_folder, root), _label_cell(record, class_names), split]
                )


def matches_split_file(recorded: Path, splits: dict[str, list[Record]], class_names: Sequence[str]) -> bool:
    """Whether ``recorded`` (a run's ``splits.csv``) lists exactly these records per split: the same
    data, drawn the same way. Labels may be written as class names, or as indices (earlier runs)."""
    with tempfile.TemporaryDirectory() as scratch:  # the file's paths are absolute, as the run's
        current = Path(scratch) / "splits.csv"
        written = []
        for names in (class_names, None):
            write_split_file(current, splits, None, class_names=names)
            written.append(current.read_bytes())
    return recorded.read_bytes() in written
