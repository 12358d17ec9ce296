"""Indexing image folders into splits, class order across folders and CSV files, and split files
(nothing is decoded, so files stay tiny)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_ft.data.csv_index import index_csv
from vision_ft.data.errors import DataError
from vision_ft.data.folder import index_folder
from vision_ft.data.records import IndexedDataset, Record
from vision_ft.data.splitting import stratified_split, write_split_file

EUROSAT_CLASSES = ("AnnualCrop", "Forest", "River")


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (value, value, value)).save(path)
    return path


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _paths(dataset: IndexedDataset) -> dict[str, list[str]]:
    return {split: [r.path for r in records] for split, records in dataset.splits.items()}


def _all_paths(dataset: IndexedDataset) -> set[str]:
    return {r.path for records in dataset.splits.values() for r in records}


def _dicom_marker_file(path: Path) -> Path:
    """Just the DICOM preamble and marker: indexing decides by them and never decodes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    return path


@pytest.fixture
def eurosat(tmp_path) -> tuple[Path, set[str]]:
    """3 classes x 10 images, one class with nested and upper-case-suffix files, plus files to ignore."""
    root = tmp_path / "eurosat"
    files = set()
    for c, name in enumerate(EUROSAT_CLASSES):
        for i in range(10):
            if name == "River" and i >= 8:
                rel = f"{name}/sub/{name}_{i}.JPG"
            else:
                rel = f"{name}/{name}_{i}.png"
            files.add(str(_png(root / rel, c * 20 + i).resolve()))
    (root / "Forest" / "notes.txt").write_text("not an image")
    _png(root / "Forest" / ".hidden.png")
    _png(root / "Forest" / ".cache" / "thumb.png")
    _png(root / ".ipynb_checkpoints" / "x.png")
    (root / "README.md").write_text("top-level files are not classes")
    return root, files


def test_folder_stratified_split_sizes_and_labels(eurosat):
    root, files = eurosat
    ds = index_folder(root, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert ds.class_names == EUROSAT_CLASSES
    assert not ds.multi_label and ds.skipped == {}
    assert set(ds.splits) == {"train", "val", "test"}
    for split, per_class in {"train": 7, "val": 2, "test": 1}.items():
        assert Counter(r.label for r in ds.splits[split]) == {0: per_class, 1: per_class, 2: per_class}
    listed = [r.path for records in ds.splits.values() for r in records]
    assert len(listed) == len(set(listed)) == 30
    assert set(listed) == files
    for records in ds.splits.values():
        for r in records:
            assert Path(r.path).is_absolute()
            assert Path(r.path).relative_to(root.resolve()).parts[0] == ds.class_names[r.label]
            assert r.labels == ()


def test_folder_split_depends_only_on_seed(eurosat):
    root, _ = eurosat
    first = _paths(index_folder(root, val_fraction=0.2, test_fraction=0.1, seed=3))
    assert _paths(index_folder(str(root), val_fraction=0.2, test_fraction=0.1, seed=3)) == first
    assert _paths(index_folder(root, val_fraction=0.2, test_fraction=0.1, seed=4)) != first
    # records keep listing order within a split
    assert first["train"] == sorted(first["train"])


def test_folder_without_test_fraction_has_no_test_split(eurosat):
    ds = index_folder(eurosat[0], val_fraction=0.1)
    assert set(ds.splits) == {"train", "val"}
    assert Counter(r.label for r in ds.splits["val"]) == {0: 1, 1: 1, 2: 1}


def test_folder_presplit_layout(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        _png(root / "train" / "cat" / f"{i}.png")
        _png(root / "train" / "dog" / f"{i}.png")
        _png(root / "train" / "eel" / f"{i}.png")
    _png(root / "valid" / "dog" / "v.png")
    _png(root / "valid" / "cat" / "v.jpeg")
    _png(root / "test" / "eel" / "t.png")
    _png(root / "extras" / "ignored.png")
    ds = index_folder(root, val_fraction=0.5, seed=1)  # fractions do not apply to a pre-split layout
    assert ds.class_names == ("cat", "dog", "eel")
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [9, 2, 1]
    assert [(Path(r.path).parent.name, r.label) for r in ds.splits["val"]] == [("cat", 0), ("dog", 1)]
    assert [r.label for r in ds.splits["test"]] == [2]
    assert all(Path(r.path).parts[-3] == "train" for r in ds.splits["train"])


def test_folder_training_testing_are_splits(tmp_path):
    """Kaggle's brain-tumour MRI layout: Training/ and Testing/ were read as two classes."""
    root = tmp_path / "ds"
    for split, count in (("Training", 3), ("Testing", 1)):
        for name in ("glioma", "meningioma"):
            for i in range(count):
                _png(root / split / name / f"{i}.png")
    ds = index_folder(root)
    assert ds.class_names == ("glioma", "meningioma")
    assert {split: len(records) for split, records in ds.splits.items()} == {"train": 6, "test": 2}


@pytest.mark.parametrize("split_named", ["train", "valid", "test"])
def test_folder_class_named_like_a_split_is_a_class(tmp_path, split_named):
    """Classes that hold their images directly (CIFAR-100's "train", a valid/invalid task): a folder
    named like a split among them is a class too, not a split missing its class folders."""
    root = tmp_path / "ds"
    names = sorted({split_named, "apple", "invalid"})
    for name in names:
        for i in range(2):
            _png(root / name / f"{i}.png")
    ds = index_folder(root, val_fraction=0.0)
    assert ds.class_names == tuple(names)
    assert len(ds.splits["train"]) == 6


def test_folder_split_named_class_beside_classes_of_the_same_layout_is_refused(tmp_path):
    """bus/, car/ and train/ each holding voc/ and coco/: read as a pre-split layout, bus and car were
    silently dropped and the classes became voc and coco."""
    root = tmp_path / "ds"
    for name in ("bus", "car", "train"):
        for source in ("voc", "coco"):
            _png(root / name / source / "0.png")
    with pytest.raises(DataError, match=r"bus/, car/.*train/ is either a class") as info:
        index_folder(root)
    assert "\n" not in str(info.value)
    for source in ("voc", "coco"):  # beside train/ and test/, folders of the same layout are extras
        _png(root / "test" / source / "0.png")
    assert index_folder(root).class_names == ("coco", "voc")


def test_folder_presplit_class_missing_from_train(tmp_path):
    root = tmp_path / "ds"
    _png(root / "train" / "cat" / "0.png")
    _png(root / "train" / "dog" / "0.png")
    _png(root / "val" / "fox" / "0.png")
    with pytest.raises(DataError, match=r"fox.*every class needs training images"):
        index_folder(root)


def test_folder_presplit_without_train(tmp_path):
    _png(tmp_path / "ds" / "val" / "cat" / "0.png")
    with pytest.raises(DataError, match="no train/ folder"):
        index_folder(tmp_path / "ds")


def test_folder_empty_class_names_it(eurosat):
    root, _ = eurosat
    (root / "SeaLake" / "sub").mkdir(parents=True)
    (root / "SeaLake" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*SeaLake holds no images"):
        index_folder(root)


def test_folder_indexes_dicom_named_by_uid_or_without_suffix(tmp_path):
    root = tmp_path / "data"
    # a class holding only such files was refused as empty
    by_uid = _dicom_marker_file(root / "ct" / "1.2.840.113619.2.5")
    no_suffix = _dicom_marker_file(root / "ct" / "series" / "IM0001")
    (root / "ct" / "NOTES").write_bytes(b"x" * 200)  # no suffix and no marker: not an image
    (root / "ct" / "short").write_bytes(b"DICM")  # too short to hold the marker at byte 128
    _dicom_marker_file(root / "ct" / ".hidden")
    png = _png(root / "xray" / "0.png")
    ds = index_folder(root, val_fraction=0.0)
    assert ds.class_names == ("ct", "xray")
    assert _all_paths(ds) == {str(by_uid.resolve()), str(no_suffix.resolve()), str(png.resolve())}


def test_folder_follows_symlinked_subfolders_without_looping(tmp_path):
    root = tmp_path / "data"
    cat = _png(root / "cat" / "0.png")
    extra = _png(tmp_path / "extra" / "1.png")
    (root / "cat" / "more").symlink_to(extra.parent, target_is_directory=True)
    (extra.parent / "back").symlink_to(root / "cat", target_is_directory=True)  # a cycle through two links
    (root / "cat" / "self").symlink_to(root / "cat", target_is_directory=True)  # a link to an ancestor
    dog = _png(root / "dog" / "sub" / "0.png")
    (root / "dog" / "twin").symlink_to(root / "dog" / "sub", target_is_directory=True)
    ds = index_folder(root, val_fraction=0.0)
    # a folder reached twice is listed once (sorted walk: 'sub' before 'twin'), so no image repeats
    assert _all_paths(ds) == {
        str(cat.resolve()),
        str(root.resolve() / "cat" / "more" / "1.png"),
        str(dog.resolve()),
    }


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("no_classes", "has no class subfolders"),
        ("one_class", r"only one class subfolder \(Forest\)"),
    ],
)
def test_folder_unusable(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "no_classes":
        _png(root / "loose.png")
    elif layout == "one_class":
        _png(root / "Forest" / "0.png")
    with pytest.raises(DataError, match=message) as info:
        index_folder(root)
    assert "data" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.0), (0.5, 0.5), (1.0, 0.0), (0.2, float("nan"))])
def test_invalid_fractions(eurosat, val, test):
    with pytest.raises(DataError, match="fraction"):
        index_folder(eurosat[0], val_fraction=val, test_fraction=test)


def test_stratified_split_small_classes_keep_training_examples():
    labels = [0] * 20 + [1] * 2 + [2]
    parts = stratified_split(labels, val_fraction=0.25, test_fraction=0.25, seed=0)
    by_split = {s: Counter(np.asarray(labels)[idx].tolist()) for s, idx in parts.items()}
    assert by_split["val"][0] == 5 and by_split["test"][0] == 5
    assert by_split["train"][1] >= 1 and by_split["train"][2] == 1
    assert by_split["val"][1] + by_split["test"][1] <= 1
    joined = np.concatenate(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(len(labels)))
    assert all(np.all(np.diff(idx) > 0) for idx in parts.values())
    assert set(stratified_split(labels, val_fraction=0.1, test_fraction=0.0, seed=0)) == {"train", "val"}


# --- CSV manifests ---


@pytest.mark.parametrize("presplit", [False, True])
def test_folder_classes_take_the_integer_and_natural_order_csv_labels_take(tmp_path, presplit):
    """Folder "10" sorted as text between "1" and "2": index 2 for what the dataset calls class 10."""
    names = ["10", "2", "0", "1", "grade10", "Grade3", "grade2"]
    for name in names:
        for i in range(2):
            _png(tmp_path / ("train" if presplit else "") / name / f"{i}.png")
    ds = index_folder(tmp_path, val_fraction=0.0)
    expected = ("0", "1", "2", "10", "grade2", "Grade3", "grade10")
    assert ds.class_names == expected
    assert {Path(r.path).parent.name: r.label for r in ds.splits["train"]} == {
        n: expected.index(n) for n in names
    }
    lines = ["path,label", *(f"{'train/' if presplit else ''}{n}/0.png,{n}" for n in names)]
    assert index_csv(_write_csv(tmp_path / "labels.csv", lines), val_fraction=0.0).class_names == expected


@pytest.mark.parametrize("presplit", [False, True])
def test_a_run_s_recorded_class_order_indexes_its_data_as_when_it_was_made(tmp_path, presplit, monkeypatch):
    """Runs made while classes sorted as text record that order: indexing their data again (resume,
    eval) in it keeps each class's index and the seeded split, which is drawn class by class."""
    from vision_ft.data import records

    names = ["10", "2", "1", "b", "A"]
    for n, name in enumerate(names):
        for i in range(6 + n):
            _png(tmp_path / ("train" if presplit else "") / name / f"{i}.png")
        if presplit:
            _png(tmp_path / "val" / name / "0.png")
    with monkeypatch.context() as earlier_release:
        earlier_release.setattr(records, "class_name_key", lambda name: name)  # text order
        made = index_folder(tmp_path, val_fraction=0.3, seed=1)
    assert made.class_names == ("1", "10", "2", "A", "b")
    assert index_folder(tmp_path, val_fraction=0.3, seed=1).class_names == ("1", "2", "10", "A", "b")
    assert index_folder(tmp_path, val_fraction=0.3, seed=1, class_order=made.class_names) == made
    # another set of names than the run's: the order of this release, and the run's checks refuse it
    other = ("1", "10", "2", "A", "c")
    assert index_folder(tmp_path, val_fraction=0.3, seed=1, class_order=other).class_names[:3] == (
        "1",
        "2",
        "10",
    )
    lines = ["path,label", *(f"{'train/' if presplit else ''}{n}/0.png,{n}" for n in names)]
    table = _write_csv(tmp_path / "labels.csv", lines)
    assert index_csv(table, val_fraction=0.0, class_order=made.class_names).class_names == made.class_names


def test_split_file_round_trip_folder(eurosat, tmp_path):
    root, _ = eurosat
    ds = index_folder(root, val_fraction=0.2, test_fraction=0.1, seed=7)
    # inside the data folder: paths are written relative, so the two can move together
    inside = root / "split.csv"
    write_split_file(inside, ds.splits, root, class_names=ds.class_names)
    text = inside.read_text(encoding="utf-8").splitlines()
    assert text[0] == "path,label,split"
    assert not Path(text[1].split(",")[0]).is_absolute()
    assert index_csv(inside, classes=ds.class_names).splits == ds.splits
    # elsewhere, without root: absolute paths, labels as class indices
    outside = tmp_path / "runs" / "split.csv"
    outside.parent.mkdir()
    write_split_file(outside, ds.splits, None)
    assert Path(outside.read_text(encoding="utf-8").splitlines()[1].split(",")[0]).is_absolute()
    back = index_csv(outside)
    assert back.splits == ds.splits and back.class_names == ("0", "1", "2")
    # elsewhere, with root: relative paths still resolve against the CSV's folder
    write_split_file(outside, ds.splits, root, class_names=ds.class_names)
    assert outside.read_text(encoding="utf-8").splitlines()[1].startswith("..")
    assert index_csv(outside, classes=ds.class_names).splits == ds.splits


def test_split_file_round_trip_multi_label(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    src = _write_csv(
        tmp_path / "src.csv", ["path,label,split", "a.png,x|y,train", "b.png,y,train", "c.png,z|x,test"]
    )
    ds = index_csv(src)
    write_split_file(tmp_path / "again.csv", ds.splits, tmp_path, class_names=ds.class_names)
    back = index_csv(tmp_path / "again.csv", classes=ds.class_names)
    assert back.splits == ds.splits and back.multi_label


def test_split_file_rejects_pipe_in_class_name(tmp_path):
    records = {"train": [Record(str(tmp_path / "a.png"), 0)]}
    with pytest.raises(DataError, match="contains '|'"):
        write_split_file(tmp_path / "s.csv", records, None, class_names=["a|b", "c"])
