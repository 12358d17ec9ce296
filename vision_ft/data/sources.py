"""``--data`` specs: which source reads the user's images."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vision_ft.data.npz import ArraySplit, DataError, load_npz_splits

BUNDLED = {
    "breastmnist": ("breastmnist.npz", ("malignant", "normal/benign")),
}


@dataclass(frozen=True)
class Dataset:
    splits: dict[str, ArraySplit]
    class_names: tuple[str, ...]
    channels: int
    description: str


def load_dataset(spec: str, *, img_size: int, interpolation: str) -> Dataset:
    """Read ``npz:PATH`` (or ``npz:bundled:NAME``) with images resized to ``img_size``."""
    kind, _, location = spec.partition(":")
    if kind != "npz" or not location:
        raise DataError(f"--data {spec!r}: expected npz:PATH")
    names: tuple[str, ...] | None = None
    if location.startswith("bundled:"):
        name = location.removeprefix("bundled:")
        if name not in BUNDLED:
            raise DataError(f"--data {spec!r}: no bundled dataset {name!r} (have: {', '.join(BUNDLED)})")
        filename, names = BUNDLED[name]
        path = Path(str(resources.files("vision_ft") / "assets" / filename))
    else:
        path = Path(location).expanduser()
    splits = load_npz_splits(path, img_size, interpolation)
    num_classes = int(max(s.labels.max() for s in splits.values())) + 1
    if min(int(s.labels.min()) for s in splits.values()) < 0:
        raise DataError(f"{path}: labels must be >= 0")
    if num_classes < 2:
        raise DataError(f"{path}: need at least two classes, found {num_classes}")
    names = names or tuple(f"class {i}" for i in range(num_classes))
    return Dataset(splits, names, splits["train"].images.shape[-1], str(path))
