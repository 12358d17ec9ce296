"""``npz:PATH`` sources: MedMNIST-style archives with ``{split}_images`` and ``{split}_labels``."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_ft.data.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ArraySplit:
    """An in-memory split: images as NHWC arrays at their stored resolution; integer labels, or
    (N, classes) 0/1 rows for multi-label data (MedMNIST's ChestMNIST layout)."""

    images: np.ndarray
    labels: np.ndarray
    name: str = "array"

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        return self.images[index]

    def example_id(self, index: int) -> str:
        return f"{self.name}[{index}]"


def load_npz(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read every split present in a MedMNIST-layout ``.npz``; ``train`` is required. Labels with
    one column are class indices; with several, every value 0 or 1, one binary column per class
    (multi-label)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if not zipfile.is_zipfile(path):  # else numpy reports any other file as "pickled data"
        raise DataError(f"data file {path} is not an .npz archive")
    try:
        # allow_pickle=False: an .npz holding object arrays cannot run code on load
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"data file {path} could not be read: {e}") from None
    splits = {}
    for split in SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise DataError(f"{path}: {split}_images and {split}_labels must come together")
        labels = labels.reshape(len(labels), -1)
        if labels.shape[1] > 1 and not np.isin(labels, (0, 1)).all():
            raise DataError(
                f"{path}: {split}_labels has {labels.shape[1]} columns but values other than 0 and 1; "
                "several columns must be one 0/1 column per class (multi-label)"
            )
        if images.ndim not in (3, 4) or len(images) != len(labels):
            raise DataError(f"{path}: {split}_images has shape {images.shape} for {len(labels)} labels")
        if images.dtype != np.uint8:
            raise DataError(f"{path}: {split}_images must be uint8, found {images.dtype}")
        labels = labels[:, 0].astype(np.int64) if labels.shape[1] == 1 else labels.astype(np.uint8)
        splits[split] = (images if images.ndim == 4 else images[..., None], labels)
    if "train" not in splits:
        raise DataError(f"{path} has no train_images/train_labels")
    if len({labels.shape[1:] for _, labels in splits.values()}) > 1:
        raise DataError(f"{path}: the splits' labels have different numbers of columns")
    return splits


def load_npz_splits(path: str | Path) -> dict[str, ArraySplit]:
    return {
        name: ArraySplit(images, labels, f"{Path(path).name}:{name}")
        for name, (images, labels) in load_npz(path).items()
    }
