"""``npz:PATH`` sources: MedMNIST-style archives with ``{split}_images`` and ``{split}_labels``."""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from numpy.lib.npyio import NpzFile

from vision_ft.data.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ArraySplit:
    """An in-memory split: images as NHWC arrays at their stored resolution; integer labels, or
    (N, classes) 0/1 rows for multi-label data (MedMNIST's ChestMNIST layout)."""

    images: np.ndarray
    labels: np.ndarray
    name: str = "array"
    # decoded already, all of one shape: no example can be unusable (see pipeline.may_be_unusable)
    always_usable: ClassVar[bool] = True

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
        missing = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {missing}")
    if not zipfile.is_zipfile(path):  # else numpy reports any other file as "pickled data"
        raise DataError(f"data file {path} is not an .npz archive")
    try:
        # allow_pickle=False: an .npz holding object arrays cannot run code on load
        archive = np.load(path, allow_pickle=False)
    except _UNREADABLE as e:
        raise DataError(f"data file {path} could not be read: {e}") from None
    if not isinstance(archive, NpzFile):  # a .npy with a zip appended passes is_zipfile
        raise DataError(f"data file {path} is not an .npz archive")
    with archive:
        # only the split members are decompressed: other members may be large or unreadable
        wanted = [f"{split}_{part}" for split in SPLITS for part in ("images", "labels")]
        arrays = {key: _read_member(path, archive, key) for key in wanted if key in archive.files}
    splits = {}
    for split in SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            raise DataError(f"{path}: {split}_images and {split}_labels must come together")
        images = _checked_images(path, f"{split}_images", images)
        labels = _checked_labels(path, f"{split}_labels", labels)
        if len(images) != len(labels):
            raise DataError(
                f"{path}: {split}_images holds {len(images)} images but {split}_labels "
                f"{len(labels)} labels — expected one label per image"
            )
        splits[split] = (images, labels)
    if "train" not in splits:
        raise DataError(f"{path} has no train_images/train_labels")
    if len({labels.shape[1:] for _, labels in splits.values()}) > 1:
        raise DataError(f"{path}: the splits' labels have different numbers of columns")
    bands = {split: 1 if images.ndim == 3 else images.shape[-1] for split, (images, _) in splits.items()}
    if len(set(bands.values())) > 1 and not set(bands.values()) <= {1, 3}:  # grey and RGB convert
        counts = ", ".join(f"{split} {count}" for split, count in bands.items())
        raise DataError(f"{path}: the splits' images have different numbers of bands ({counts})")
    return splits


# What a damaged archive raises while numpy opens it or decompresses a member: zipfile checks CRCs
# (BadZipFile), zlib reports a broken deflate stream, numpy a bad .npy header or an object array
# (ValueError), a truncated member ends early (EOFError), and zipfile refuses encrypted members
# (RuntimeError) and unknown compression methods (NotImplementedError).
_UNREADABLE = (
    OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError,
)  # fmt: skip


def _read_member(path: Path, archive: NpzFile, key: str) -> np.ndarray:
    try:
        member = archive[key]  # NpzFile decompresses a member only when it is indexed
    except ValueError as e:  # numpy's own complaint (bad header, object array) explains itself
        raise DataError(f"{path}: {key} could not be read: {e}") from None
    except _UNREADABLE as e:
        raise DataError(f"{path}: {key} could not be read (damaged file?): {e}") from None
    if not isinstance(member, np.ndarray):  # numpy hands back the raw bytes of a non-.npy member
        raise DataError(f"{path}: {key} is not a NumPy array (.npy) member")
    return member


def _checked_images(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    """``images`` as NHWC, or a DataError saying what is wrong with them."""
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: {key} has shape {images.shape} — expected (N, H, W) or (N, H, W, C)")
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be uint8, found {images.dtype}")
    if len(images) == 0:  # nothing to train or evaluate on; training on it would fail much later
        raise DataError(f"{path}: {key} holds no images — leave the split out instead")
    if 0 in images.shape[1:]:
        raise DataError(f"{path}: {key} has shape {images.shape} — an image has no pixels or no bands")
    if images.ndim == 4 and images.shape[1] == images.shape[2] == images.shape[3] > 4:
        # MedMNIST 3D's layout: as NHWC, one spatial axis would become the bands
        raise DataError(
            f"{path}: {key} has shape {images.shape}, which looks like 3-D volumes (MedMNIST 3D); "
            "vision-ft trains on 2-D images (N, H, W) or (N, H, W, bands)"
        )
    return images if images.ndim == 4 else images[..., None]


def _checked_labels(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    """Class indices (N,) as int64 or multi-label 0/1 rows (N, classes) as uint8, or a DataError."""
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] == 0):
        raise DataError(
            f"{path}: {key} has shape {labels.shape} — expected one label per image, shape (N,) or "
            "(N, 1), or (N, classes) of 0/1 for multi-label data"
        )
    # b/i/u/f: strings, complex numbers and structured records would be silently coerced or fail
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{path}: {key} has dtype {labels.dtype} — expected integer class labels")
    labels = labels if labels.ndim == 2 else labels[:, None]
    if labels.shape[1] > 1:
        if not np.isin(labels, (0, 1)).all():
            raise DataError(
                f"{path}: {key} has {labels.shape[1]} columns but values other than 0 and 1; "
                "several columns must be one 0/1 column per class (multi-label)"
            )
        return labels.astype(np.uint8)
    indices = labels[:, 0]
    if indices.dtype.kind == "f":
        # casting would truncate 0.5 to 0 and turn NaN or 1e30 into arbitrary integers
        not_whole = ~np.isfinite(indices) | (indices != np.round(indices)) | (np.abs(indices) >= 2.0**63)
        if not_whole.any():
            raise DataError(
                f"{path}: {key} holds {indices[not_whole][0]} — expected whole-number class indices"
            )
    if len(indices) and indices.min() < 0:
        raise DataError(f"{path}: {key} holds {indices.min()} — class indices must be >= 0")
    return indices.astype(np.int64)


def load_npz_splits(path: str | Path) -> dict[str, ArraySplit]:
    return {
        name: ArraySplit(images, labels, f"{Path(path).name}:{name}")
        for name, (images, labels) in load_npz(path).items()
    }
