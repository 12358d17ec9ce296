"""The index of a file-backed dataset: which file is which example, with which label, in which split."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_INTEGER = re.compile(r"[+-]?[0-9]+")
_DIGIT_RUNS = re.compile(r"([0-9]+)")


def class_name_key(name: str) -> tuple:
    """The order that gives class names their indices, for folders and CSV labels alike: integer
    names numerically (2 before 10), ahead of the others, which follow timm's natural order ("grade2"
    before "grade10", case aside), the name itself breaking ties. Text order put folder "10" between
    "1" and "2": index 2 for what a dataset's own labels call class 10."""
    if _INTEGER.fullmatch(name):
        return (0, int(name), (), name)
    # the split alternates text and digit runs, so that like is compared with like
    parts = tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGIT_RUNS.split(name.lower())))
    return (1, 0, parts, name)


def ordered_classes(names, class_order: tuple[str, ...] | None) -> list[str]:
    """``names`` in ``class_name_key`` order, or in ``class_order`` where that holds the same names:
    a run's own order, so that data indexed again for its resume or evaluation keeps the class
    indices (and the seeded split, drawn class by class) of a release that ordered names otherwise."""
    if class_order is not None and sorted(class_order) == sorted(names):
        return list(class_order)
    return sorted(names, key=class_name_key)


@dataclass(frozen=True)
class Record:
    """One example: an absolute file path and its class index (or class indices when multi-label)."""

    path: str
    label: int
    labels: tuple[int, ...] = ()  # every class of a multi-label example; () for single-label data


@dataclass(frozen=True)
class IndexedDataset:
    """Records per split (``train``, and ``val``/``test`` where present) and the ordered class names."""

    splits: dict[str, list[Record]]
    class_names: tuple[str, ...]
    multi_label: bool = False
    # files left out while indexing (e.g. a CSV row naming a missing file): path -> reason
    skipped: dict[str, str] = field(default_factory=dict)
    # the split of each skipped file whose row placed it (a CSV split column): path -> split
    skipped_splits: dict[str, str] = field(default_factory=dict)
