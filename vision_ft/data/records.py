"""The index of a file-backed dataset: which file is which example, with which label, in which split."""

from __future__ import annotations

from dataclasses import dataclass, field


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
