"""``csv:FILE`` sources: a manifest with a header naming ``path``, ``label`` and optionally ``split``.

Rows are numbered by their line in the file (the header is row 1), as an editor shows them. A row that
cannot be used on its own (missing file, empty cell, unknown label) is left out and listed in
``IndexedDataset.skipped``, so one bad row does not stop a 100k-row dataset; problems with the file as
a whole raise ``DataError``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vision_ft.data.errors import DataError
from vision_ft.data.records import IndexedDataset, Record, ordered_classes
from vision_ft.data.splitting import SPLIT_ORDER, check_fractions, stratified_split

REQUIRED_COLUMNS = ("path", "label")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class _Row:
    line: int
    path: str  # absolute, normalised
    labels: tuple[str, ...]
    split: str | None


def _read_table(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows with their line numbers."""
    if not csv_path.exists():
        raise DataError(f"CSV file {csv_path} does not exist")
    if not csv_path.is_file():
        raise DataError(f"CSV file {csv_path} is not a file")
    try:
        # utf-8-sig: spreadsheet programs often start their CSV exports with a byte-order mark
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except UnicodeDecodeError as e:
        raise DataError(f"CSV file {csv_path} is not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except csv.Error as e:
        raise DataError(f"CSV file {csv_path} could not be parsed: {e}") from None
    except OSError as e:
        raise DataError(f"CSV file {csv_path} could not be read: {e.strerror}") from None
    if header is None:
        raise DataError(f"CSV file {csv_path} is empty; expected a header row path,label[,split]")
    return header, rows


def _column_positions(csv_path: Path, header: list[str]) -> dict[str, int]:
    positions: dict[str, int] = {}
    for i, name in enumerate(header):
        positions.setdefault(name.strip().lower(), i)
    missing = [name for name in REQUIRED_COLUMNS if name not in positions]
    if missing:
        raise DataError(
            f"CSV file {csv_path}: header has no {' or '.join(missing)} column "
            f"(found {','.join(header)}); the first row must name the columns path,label[,split]"
        )
    return positions


def _cell(cells: list[str], position: int | None) -> str:
    return cells[position].strip() if position is not None and position < len(cells) else ""


def _split_of(csv_path: Path, value: str, line: int) -> str:
    if not value:
        raise DataError(
            f"CSV file {csv_path}: row {line} has an empty split; with a split column every row needs one"
        )
    split = SPLIT_NAMES.get(value.lower())
    if split is None:
        raise DataError(f"CSV file {csv_path}: row {line} has split {value!r}; expected train, val or test")
    return split


class _Skipped:
    """Rows left out while indexing: what each was (a path, or the CSV row that had none) -> why, and,
    with a split column, the split the user placed it in, so a split reports only its own rows."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.splits: dict[str, str] = {}

    def add(self, key: str, reason: str, line: int, split: str | None) -> None:
        if key in self.reasons:  # one file on two rows (of two splits): each row is reported
            key = f"{key} (row {line})"
        self.reasons[key] = reason
        if split is not None:
            self.splits[key] = split


def _parse_rows(
    csv_path: Path, positions: dict[str, int], table: list[tuple[int, list[str]]], skipped: _Skipped
) -> list[_Row]:
    """Rows with a path and a label; rows missing either are recorded in ``skipped``."""
    # relative to the folder of the path the user gave, even if the CSV itself is a link to a file
    # elsewhere (as pandas reads it); that folder's own links are resolved so '..' means what the OS means
    folder = csv_path.parent.resolve()
    split_at = positions.get("split")
    rows = []
    first_line: dict[str, int] = {}
    for line, cells in table:
        split = _split_of(csv_path, _cell(cells, split_at), line) if split_at is not None else None
        raw_path = _cell(cells, positions["path"])
        if not raw_path:
            skipped.add(f"{csv_path} row {line}", f"empty path (row {line})", line, split)
            continue
        path = os.path.normpath(os.path.join(folder, os.path.expanduser(raw_path)))
        if split_at is None and path in first_line:
            # the split is ours to make: two records of one file would land apart, the same image
            # in train and test (with a split column the user has placed every row)
            raise DataError(
                f"CSV file {csv_path}: rows {first_line[path]} and {line} both name {path}; list each image "
                "once (labels 'a|b' for several)"
            )
        first_line[path] = line
        # 'a|b' marks a multi-label row; repeated or blank parts are dropped
        labels = tuple(
            dict.fromkeys(p.strip() for p in _cell(cells, positions["label"]).split("|") if p.strip())
        )
        if not labels:
            skipped.add(path, f"empty label (row {line})", line, split)
            continue
        rows.append(_Row(line, path, labels, split))
    return rows


def _class_names(
    csv_path: Path, rows: list[_Row], classes: Sequence[str] | None, class_order: tuple[str, ...] | None
) -> tuple[str, ...]:
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if len(set(names)) != len(names):
            raise DataError(f"CSV file {csv_path}: the given class list repeats a name")
    else:
        # every labelled row counts, even one whose file is missing, so class indices do not
        # depend on which files happen to be present
        names = tuple(ordered_classes({label for row in rows for label in row.labels}, class_order))
    if len(names) < 2:
        raise DataError(
            f"CSV file {csv_path}: need at least two classes, found {len(names)} ({', '.join(names)})"
        )
    return names


def _records(
    rows: list[_Row], class_names: tuple[str, ...], multi_label: bool, skipped: _Skipped
) -> tuple[list[Record], list[str | None]]:
    """Records for rows whose labels are known and whose files exist, with each one's split."""
    index = {name: i for i, name in enumerate(class_names)}
    records, splits = [], []
    for row in rows:
        unknown = [label for label in row.labels if label not in index]
        if unknown:
            skipped.add(row.path, f"label {unknown[0]!r} out of range (row {row.line})", row.line, row.split)
            continue
        if not os.path.isfile(row.path):
            reason = "is not a file" if os.path.exists(row.path) else "file does not exist"
            skipped.add(row.path, f"{reason} (row {row.line})", row.line, row.split)
            continue
        indices = tuple(index[label] for label in row.labels)
        records.append(Record(row.path, indices[0], indices if multi_label else ()))
        splits.append(row.split)
    return records, splits


def _given_splits(csv_path: Path, records: list[Record], splits: list[str | None]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {}
    for record, split in zip(records, splits, strict=True):
        grouped.setdefault(split, []).append(record)
    if "train" not in grouped:
        raise DataError(f"CSV file {csv_path} has no usable train rows")
    return {split: grouped[split] for split in SPLIT_ORDER if split in grouped}


def index_csv(
    path: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    class_order: tuple[str, ...] | None = None,
) -> IndexedDataset:
    """Index a CSV manifest into splits; relative paths resolve against the folder of ``path`` as given
    (if ``path`` is a symlink, its own folder, not its target's).

    ``label`` is a class name, or names joined by ``|`` for multi-label data (then ``multi_label`` is
    set, ``Record.labels`` holds every class index and ``Record.label`` the first). Class names are
    the unique labels in ``class_name_key`` order (or ``class_order``'s, for the same names) unless
    ``classes`` fixes them, in which case rows with other labels are skipped. With a ``split`` column
    (train, val/valid/validation, test) the rows are split as written; without one, by
    ``stratified_split`` on each row's first label.
    """
    csv_path = Path(path).expanduser().absolute()  # not resolve(): that would follow a linked CSV
    header, table = _read_table(csv_path)
    positions = _column_positions(csv_path, header)
    if "split" not in positions:
        check_fractions(val_fraction, test_fraction)
    skipped = _Skipped()
    rows = _parse_rows(csv_path, positions, table, skipped)
    class_names = _class_names(csv_path, rows, classes, class_order) if rows else ()
    multi_label = any(len(row.labels) > 1 for row in rows)
    records, row_splits = _records(rows, class_names, multi_label, skipped)
    if not records:
        first = "; first: {}: {}".format(*next(iter(skipped.reasons.items()))) if skipped.reasons else ""
        raise DataError(f"CSV file {csv_path} has no usable rows ({len(skipped.reasons)} skipped{first})")
    if "split" in positions:
        splits = _given_splits(csv_path, records, row_splits)
    else:
        parts = stratified_split(
            [r.label for r in records], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        splits = {split: [records[i] for i in indices] for split, indices in parts.items()}
    return IndexedDataset(
        splits, class_names, multi_label=multi_label, skipped=skipped.reasons, skipped_splits=skipped.splits
    )
