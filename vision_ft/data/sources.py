"""``--data`` specs: which source reads the user's images.

- ``npz:PATH`` (or ``npz:bundled:NAME``): MedMNIST-layout arrays, official splits.
- ``folder:DIR``: class subfolders, with ``train/``/``val/``/``test/`` or a seeded stratified split.
- ``csv:FILE``: ``path,label[,split]`` rows.
- ``tfds:NAME[/CONFIG][:SPLIT]``: a prepared TensorFlow Datasets catalog entry (``--data-dir``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from vision_ft.data.errors import BadImageError, DataError, is_utf8
from vision_ft.data.npz import load_npz_splits
from vision_ft.data.pipeline import ExampleSplit
from vision_ft.data.records import IndexedDataset

BUNDLED = {
    "breastmnist": ("breastmnist.npz", ("malignant", "normal/benign")),
}
KINDS = ("npz", "folder", "csv", "tfds")


@dataclass(frozen=True)
class DataOptions:
    """How specs that need it are split and decoded."""

    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    data_dir: str | None = None  # TFDS data_dir
    window: tuple[float, float] | None = None  # DICOM window (center, width)
    # a run's recorded class names, for data indexed again to resume or evaluate it (ordered_classes)
    class_order: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Dataset:
    splits: dict[str, ExampleSplit]
    class_names: tuple[str, ...]
    channels: int
    description: str
    index: IndexedDataset | None = None  # file sources: which file is in which split
    multi_label: bool = False  # labels are (N, classes) multi-hot rows rather than class indices
    skipped: dict[str, str] = field(default_factory=dict)  # left out while indexing: path -> reason

    def skipped_from(self, split: str) -> dict[str, str]:
        """The files left out while indexing that ``split`` would have held: those placed in it,
        and those of data without a split column (the split drawn later could have held any)."""
        placed = self.index.skipped_splits if self.index is not None else {}
        return {p: r for p, r in self.skipped.items() if placed.get(p, split) == split}


def recorded_data(spec: str) -> str:
    """``--data`` as a run's or an embedding's files record it: a file or folder by its absolute
    path, so that a later command reads the same data from wherever it starts, and two spellings of
    one path (``npz:./x.npz``, ``npz:x.npz``) compare equal."""
    kind, _, location = spec.partition(":")
    if kind not in ("npz", "folder", "csv") or not location or location.startswith("bundled:"):
        return spec
    return f"{kind}:{os.path.abspath(_data_path(spec, location))}"


def _data_path(spec: str, location: str) -> Path:
    if not is_utf8(location):
        raise DataError(f"--data {spec!r}: the path is not valid UTF-8; rename it")
    try:
        return Path(location).expanduser()
    except RuntimeError:  # "~name" where no user has that name (or no HOME for "~")
        raise DataError(f"--data {spec!r}: {location.split('/')[0]} names no home directory here") from None


def load_dataset(spec: str, options: DataOptions = DataOptions()) -> Dataset:
    """Read the index (and, for arrays, the pixels) of ``spec``; files are decoded later, on demand."""
    kind, _, location = spec.partition(":")
    if kind not in KINDS or not location:
        raise DataError(f"--data {spec!r}: expected one of npz:PATH, folder:DIR, csv:FILE, tfds:NAME")
    if kind == "npz":
        return _npz(spec, location)
    if kind == "tfds":
        return _tfds(spec, location, options)
    return _files(spec, kind, location, options)


def _npz(spec: str, location: str) -> Dataset:
    names: tuple[str, ...] | None = None
    if location.startswith("bundled:"):
        name = location.removeprefix("bundled:")
        if name not in BUNDLED:
            raise DataError(f"--data {spec!r}: no bundled dataset {name!r} (have: {', '.join(BUNDLED)})")
        filename, names = BUNDLED[name]
        path = Path(str(resources.files("vision_ft") / "assets" / filename))
    else:
        path = _data_path(spec, location)
    splits = load_npz_splits(path)
    multi_label = splits["train"].labels.ndim == 2
    if multi_label:
        num_classes = splits["train"].labels.shape[1]
    else:
        num_classes = _check_labels(path, {k: s.labels for k, s in splits.items()})
    names = names or tuple(f"class {i}" for i in range(num_classes))
    channels = splits["train"].images.shape[-1]
    return Dataset(splits, names, channels, str(path), multi_label=multi_label)


# more than any classification dataset has (Google Landmarks v2: 203,094 classes)
MAX_CLASSES = 1_000_000


def _check_labels(where, labels: dict[str, np.ndarray]) -> int:
    if min(int(v.min()) for v in labels.values() if len(v)) < 0:
        raise DataError(f"{where}: labels must be >= 0")
    num_classes = int(max(int(v.max()) for v in labels.values() if len(v))) + 1
    if num_classes > MAX_CLASSES:  # a stray value, not a class index: a head this wide never fits
        raise DataError(f"{where}: label {num_classes - 1} is not a class index (at most {MAX_CLASSES - 1})")
    if num_classes < 2:
        raise DataError(f"{where}: need at least two classes, found {num_classes}")
    return num_classes


def _files(spec: str, kind: str, location: str, options: DataOptions) -> Dataset:
    from vision_ft.data.files import FileSplit

    split_args = dict(
        val_fraction=options.val_fraction, test_fraction=options.test_fraction, seed=options.seed,
        class_order=options.class_order,
    )  # fmt: skip
    if kind == "folder":
        from vision_ft.data.folder import index_folder

        index = index_folder(_data_path(spec, location), **split_args)
    else:
        from vision_ft.data.csv_index import index_csv

        index = index_csv(_data_path(spec, location), **split_args)
    if not index.splits.get("train"):
        raise DataError(f"--data {spec!r}: no training examples")
    classes = len(index.class_names) if index.multi_label else None
    splits = {
        name: FileSplit(records, window=options.window, multi_label_classes=classes)
        for name, records in index.splits.items()
    }
    # sampled from every indexed image in path order: which images the seeded split draws for training
    # must not decide the model's input bands
    every_image = sorted((r for records in index.splits.values() for r in records), key=lambda r: r.path)
    channels = _dataset_channels(spec, FileSplit(every_image, window=options.window))
    return Dataset(
        splits, index.class_names, channels, spec, index=index, multi_label=index.multi_label,
        skipped=dict(index.skipped),
    )  # fmt: skip


def _dataset_channels(spec: str, split: ExampleSplit, tries: int = 32, sample: int = 8) -> int:
    """The band count of the data, from ``sample`` readable images spread over ``split`` (folders
    and CSV files list their classes one after another, and one class may be all grey): 3
    where grey and colour photos mix (the pipeline repeats grey ones to RGB, as timm reads every photo
    as RGB), else the first one's."""
    spread = [*_spread(len(split), sample), *_spread(len(split), tries)]
    counts, reasons = [], []
    for i in dict.fromkeys(spread):  # the sample first, then others in place of unreadable ones
        try:
            image = split.load(i)
        except BadImageError as e:
            reasons.append(str(e))
            continue
        counts.append(1 if image.ndim == 2 else int(image.shape[-1]))
        if len(counts) == sample:
            break
    if not counts:
        unreadable = f"none of {len(reasons)} images sampled across the data can be read ({reasons[0]})"
        raise DataError(f"--data {spec!r}: {unreadable}")
    return 3 if set(counts) == {1, 3} else counts[0]


def _spread(size: int, count: int) -> list[int]:
    """Up to ``count`` indices evenly spaced over ``range(size)``, first and last included."""
    count = min(size, count)
    return sorted({round(k * (size - 1) / max(count - 1, 1)) for k in range(count)})


def _tfds(spec: str, location: str, options: DataOptions) -> Dataset:
    from vision_ft.data.tfds_source import load_tfds

    splits, class_names = load_tfds(
        location, data_dir=options.data_dir, val_fraction=options.val_fraction,
        test_fraction=options.test_fraction, seed=options.seed,
    )  # fmt: skip
    return Dataset(splits, tuple(class_names), _dataset_channels(spec, splits["train"]), spec)
