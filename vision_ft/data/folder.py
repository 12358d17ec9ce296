"""``folder:DIR`` sources: one subfolder per class (ImageFolder / EuroSAT layout), optionally under
``train/``, ``val/`` and ``test/``.

Indexing only lists files; nothing is opened, so a folder of 100k images indexes in about a second and
a corrupted image is reported when it is decoded, not here.
"""

from __future__ import annotations

import os
from pathlib import Path

from vision_ft.data.decode import IMAGE_SUFFIXES, image_kind
from vision_ft.data.errors import BadImageError, DataError, is_utf8
from vision_ft.data.records import IndexedDataset, Record, class_name_key, ordered_classes
from vision_ft.data.splitting import SPLIT_ORDER, check_fractions, stratified_split

# folder names (lower-cased) that mark a pre-split layout, and the split each one holds
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _listing_error(error: OSError) -> DataError:
    return DataError(f"cannot list {error.filename}: {error.strerror}")


def _visible_subdirs(folder: Path) -> list[Path]:
    """Subfolders in class-name order; hidden ones ('.git', '.ipynb_checkpoints') are never classes."""
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    except OSError as e:
        raise _listing_error(e) from None
    return [folder / name for name in sorted(names, key=class_name_key)]


def _raise(error: OSError) -> None:
    # os.walk silently skips folders it cannot read, which would make a class look empty
    raise _listing_error(error)


def _is_image_file(path: str) -> bool:
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True
    # DICOM exports are often named by UID (suffix '.5') or have no suffix; asking the decoder's own
    # rule (the DICM marker, a 132-byte read) keeps indexing and decoding in agreement
    try:
        return image_kind(path) == "dicom"
    except BadImageError:  # not DICOM, or unreadable: like any file of another type, not an image
        return False


def _directory_identity(path: str) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except OSError as e:
        raise _listing_error(e) from None
    return info.st_dev, info.st_ino


def image_files(folder: Path) -> list[str]:
    """Image files anywhere under ``folder``, sorted so that indexing is deterministic.

    Symlinked subfolders are followed (as torchvision's ImageFolder does), but each real folder is
    listed once, so a link back to an ancestor cannot loop and a folder linked twice gives no duplicate
    records (which could otherwise land in both train and test).
    """
    found = []
    listed: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise, followlinks=True):
        identity = _directory_identity(dirpath)
        if identity in listed:
            dirnames[:] = []
            continue
        listed.add(identity)
        # sorted, so that which path of a folder linked twice is kept does not depend on the file system
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            path
            for path in (os.path.join(dirpath, name) for name in filenames if not name.startswith("."))
            if _is_image_file(path)
        )
    unwritable = next((path for path in found if not is_utf8(path)), None)
    if unwritable is not None:
        raise DataError(f"{unwritable!r}: the file name is not valid UTF-8; rename it")
    return sorted(found)


def _class_records(class_dir: Path, label: int) -> list[Record]:
    files = image_files(class_dir)
    if not files:
        raise DataError(f"class folder {class_dir} holds no images")
    return [Record(path, label) for path in files]


def _check_class_count(folder: Path, class_names: list[str]) -> None:
    if not class_names:
        raise DataError(f"{folder} has no class subfolders (expected one subfolder of images per class)")
    if len(class_names) < 2:
        raise DataError(
            f"{folder} has only one class subfolder ({class_names[0]}); need at least two classes"
        )


def _holds_images_directly(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            files = [e.path for e in entries if not e.name.startswith(".") and e.is_file()]
    except OSError as e:
        raise _listing_error(e) from None
    return any(_is_image_file(path) for path in files)


def _split_folders(root: Path) -> dict[str, Path]:
    """``train``/``val``/``test`` subfolders of ``root`` (``training``, ``valid``, ``validation`` and
    ``testing`` count too), or none where the folders named like splits are classes among others."""
    found: dict[str, Path] = {}
    others = []
    for sub in _visible_subdirs(root):
        split = SPLIT_FOLDERS.get(sub.name.lower())
        if split is None:
            others.append(sub)
            continue
        if split in found:
            raise DataError(f"{root}: both {found[split].name}/ and {sub.name}/ look like the {split} split")
        found[split] = sub
    if not found:
        return found
    # the split-named folders first: a real split's holds class folders, so the siblings go unread
    if all(not _visible_subdirs(d) and _holds_images_directly(d) for d in found.values()) and any(
        _holds_images_directly(d) for d in others
    ):
        return {}  # CIFAR-100's "train", a valid/invalid task: classes holding their images
    split_names = ", ".join(f"{d.name}/" for d in found.values())
    classes_inside = {d.name for split_dir in found.values() for d in _visible_subdirs(split_dir)}
    # one split-named folder beside folders of the same layout is a class as likely as a split (bus/,
    # car/ and train/ each holding voc/ and coco/); beside train/ and val/ or test/, they are extras
    alike = [d for d in others if classes_inside & {sub.name for sub in _visible_subdirs(d)}]
    if alike and len(found) == 1:
        names = ", ".join(f"{d.name}/" for d in alike)
        raise DataError(
            f"{root}: {names} hold the same subfolders as {split_names} so {split_names} is either a "
            f"class among them or the only split beside extra folders; rename it or them, or index the "
            "images with a csv: file"
        )
    if "train" not in found:
        names = ", ".join(f"{p.name}/" for p in found.values())
        raise DataError(f"{root} has {names} but no train/ folder")
    return found


def _index_presplit(
    root: Path, split_dirs: dict[str, Path], class_order: tuple[str, ...] | None
) -> IndexedDataset:
    class_dirs = {split: _visible_subdirs(folder) for split, folder in split_dirs.items()}
    for split, dirs in class_dirs.items():
        if not dirs:
            raise DataError(f"{split_dirs[split]} has no class subfolders")
    train_classes = {d.name for d in class_dirs["train"]}
    for dirs in class_dirs.values():
        for d in dirs:
            if d.name not in train_classes:
                raise DataError(
                    f"class folder {d} is not in {split_dirs['train']}: every class needs training images"
                )
    class_names = ordered_classes(train_classes, class_order)
    _check_class_count(split_dirs["train"], class_names)
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split in SPLIT_ORDER:
        if split in class_dirs:
            in_class_order = sorted(class_dirs[split], key=lambda d: index[d.name])
            splits[split] = [r for d in in_class_order for r in _class_records(d, index[d.name])]
    return IndexedDataset(splits, tuple(class_names))


def index_folder(
    root: str | Path,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    class_order: tuple[str, ...] | None = None,
) -> IndexedDataset:
    """Index ``root/<class>/**/<image>`` into splits; a class index is its place in ``class_name_key`` order.

    If ``root`` holds ``train/`` (or ``training/``; optionally ``val/``, ``valid/``, ``test/``), those
    folders are the splits as the dataset's authors made them and the fractions are not used; other
    subfolders next to them are ignored, unless they hold images as the split-named folders do (then
    all are classes), or hold the same class folders as a lone split-named folder (ambiguous, refused).
    Otherwise the images are split per class with ``stratified_split``. ``class_order`` (a run's
    recorded class names) orders classes that have the same names (``ordered_classes``).
    Records hold absolute paths. Hidden files and folders are skipped, and so are files with other
    suffixes unless they carry the DICOM marker (DICOM files named by UID or with no suffix).
    """
    check_fractions(val_fraction, test_fraction)
    folder = Path(root).expanduser()
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} is not a folder")
    folder = folder.resolve()
    split_dirs = _split_folders(folder)
    if split_dirs:
        return _index_presplit(folder, split_dirs, class_order)
    by_name = {d.name: d for d in _visible_subdirs(folder)}
    class_names = ordered_classes(by_name, class_order)
    class_dirs = [by_name[name] for name in class_names]
    _check_class_count(folder, class_names)
    records = [r for label, d in enumerate(class_dirs) for r in _class_records(d, label)]
    parts = stratified_split(
        [r.label for r in records], val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    splits = {split: [records[i] for i in indices] for split, indices in parts.items()}
    return IndexedDataset(splits, tuple(class_names))
