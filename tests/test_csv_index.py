"""Indexing CSV manifests: relative paths, split columns, multi-label rows, skipped rows and their
splits, label order, and unusable files (nothing is decoded, so files stay tiny)."""

from collections import Counter
from pathlib import Path

import pytest

from tests.test_index import _paths, _png, _write_csv
from vision_ft.data.csv_index import index_csv
from vision_ft.data.errors import DataError
from vision_ft.data.records import Record
from vision_ft.data.splitting import write_split_file


def test_csv_relative_and_absolute_paths_stratified(tmp_path):
    images = tmp_path / "images"
    outside = _png(tmp_path / "elsewhere" / "far.png")
    lines = ["id,path,label,notes"]
    for i in range(10):
        _png(images / f"a{i}.png")
        _png(images / f"b{i}.png")
        lines += [f"{i},images/a{i}.png,cat,x", f"{i},images/b{i}.png,dog,y"]
    lines.append(f"99,{outside},dog,absolute")
    csv_path = _write_csv(tmp_path / "data.csv", lines)
    ds = index_csv(csv_path, val_fraction=0.2, seed=0)
    assert ds.class_names == ("cat", "dog") and not ds.multi_label
    assert set(ds.splits) == {"train", "val"}
    assert Counter(r.label for r in ds.splits["val"]) == {0: 2, 1: 2}
    all_records = [r for records in ds.splits.values() for r in records]
    assert len(all_records) == 21
    assert Record(str((images / "a3.png").resolve()), 0) in all_records
    assert Record(str(outside.resolve()), 1) in all_records
    assert _paths(index_csv(csv_path, val_fraction=0.2, seed=0)) == _paths(ds)


def test_csv_symlink_resolves_paths_beside_the_link(tmp_path):
    """``c1/m.csv -> c2/m.csv``: rows ``img/a.png`` name c1/img/a.png, as pandas would read them."""
    c1, c2 = tmp_path / "c1", tmp_path / "c2"
    images = [_png(c1 / "img" / "a.png"), _png(c1 / "img" / "b.png")]
    target = c2 / "m.csv"
    c2.mkdir()
    _write_csv(target, ["path,label,split", "img/a.png,cat,train", "img/b.png,dog,train"])
    (c1 / "m.csv").symlink_to(target)
    ds = index_csv(c1 / "m.csv")
    assert ds.skipped == {}
    assert _paths(ds) == {"train": [str(p.resolve()) for p in images]}
    # a split file written into a folder reached through a linked folder reads back the same records
    linked = tmp_path / "linked"
    linked.symlink_to(c1, target_is_directory=True)
    write_split_file(linked / "splits.csv", ds.splits, linked, class_names=ds.class_names)
    first_row = (c1 / "splits.csv").read_text(encoding="utf-8").splitlines()[1]
    assert not Path(first_row.split(",")[0]).is_absolute()
    assert index_csv(linked / "splits.csv", classes=ds.class_names).splits == ds.splits


def test_csv_split_column_multi_label_and_skips(tmp_path):
    for name in ("a", "b", "c", "d"):
        _png(tmp_path / f"{name}.png")
    csv_path = _write_csv(
        tmp_path / "m.csv",
        [
            "Path,Label,Split",
            "a.png,sky|sea,train",
            "b.png,sea,Valid",
            "c.png,rock|sky|rock,test",
            "gone.png,sky,train",
            ",sea,train",
            "d.png,,train",
            "",
            "a.png,sea,validation",
        ],
    )
    ds = index_csv(csv_path)
    assert ds.multi_label and ds.class_names == ("rock", "sea", "sky")
    a, b, c = (str((tmp_path / f"{n}.png").resolve()) for n in "abc")
    assert ds.splits == {
        "train": [Record(a, 2, (2, 1))],
        "val": [Record(b, 1, (1,)), Record(a, 1, (1,))],
        "test": [Record(c, 0, (0, 2))],
    }
    gone = str((tmp_path / "gone.png").resolve())
    assert ds.skipped[gone] == "file does not exist (row 5)"
    assert "empty path (row 6)" in ds.skipped.values()
    assert ds.skipped[str((tmp_path / "d.png").resolve())] == "empty label (row 7)"
    assert all(gone != r.path for records in ds.splits.values() for r in records)


def test_each_skipped_csv_row_is_reported_with_the_split_it_was_placed_in(tmp_path):
    """Rows without a path or a label were reported as bad examples of every split (only rows that
    had both were given theirs), and a file placed in train whose test row had no label counted as
    bad in train, not test."""
    from vision_ft.data.sources import load_dataset

    for name in ("a", "b", "c", "d"):
        _png(tmp_path / f"{name}.png")
    csv_path = _write_csv(
        tmp_path / "m.csv",
        [
            "path,label,split",
            "a.png,x,train",
            "b.png,y,train",
            "c.png,x,test",
            "d.png,y,test",
            "e.png,,train",
            ",x,train",
            "a.png,,test",
            "gone.png,,train",
            "gone.png,x,test",
        ],
    )
    ds = load_dataset(f"csv:{csv_path}")
    a, e, gone = (str((tmp_path / name).resolve()) for name in ("a.png", "e.png", "gone.png"))
    assert ds.skipped_from("train") == {
        e: "empty label (row 6)",
        f"{csv_path.resolve()} row 7": "empty path (row 7)",
        gone: "empty label (row 9)",
    }
    assert ds.skipped_from("test") == {
        a: "empty label (row 8)",
        f"{gone} (row 10)": "file does not exist (row 10)",
    }
    assert ds.skipped_from("val") == {}


def test_csv_labels_outside_given_classes_are_skipped(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
    csv_path = _write_csv(
        tmp_path / "c.csv", ["path,label,split", "a.png,x,train", "b.png,y,val", "c.png,z,train"]
    )
    ds = index_csv(csv_path, classes=["y", "x"])
    assert ds.class_names == ("y", "x")
    assert ds.splits == {
        "train": [Record(str((tmp_path / "a.png").resolve()), 1)],
        "val": [Record(str((tmp_path / "b.png").resolve()), 0)],
    }
    assert ds.skipped == {str((tmp_path / "c.png").resolve()): "label 'z' out of range (row 4)"}


def test_csv_integer_labels_sort_numerically(tmp_path):
    lines = ["path,label"]
    for i, label in enumerate(["10", "2", "1", "0", "2", "10"]):
        _png(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{label}")
    ds = index_csv(_write_csv(tmp_path / "n.csv", lines), val_fraction=0.0)
    assert ds.class_names == ("0", "1", "2", "10")
    assert [r.label for r in ds.splits["train"]] == [3, 2, 1, 0, 2, 3]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["file,label", "a.png,x"], "header has no path column"),
        (["a.png,x", "b.png,y"], "header has no path or label column"),
        ([], "is empty"),
        (["path,label", "gone.png,x", "gone2.png,y"], "no usable rows.*file does not exist"),
        (["path,label,split", "a.png,x,train", "a.png,y,"], "row 3 has an empty split"),
        (["path,label,split", "a.png,x,train", "a.png,y,holdout"], "row 3 has split 'holdout'"),
        (["path,label,split", "a.png,x,val", "b.png,y,test"], "no usable train rows"),
        (["path,label", "a.png,x", "b.png,x"], "need at least two classes"),
        # one file twice would be split apart: the same image in train and test
        (["path,label", "a.png,x", "b.png,y", "./a.png,y"], r"rows 2 and 4 both name .*a.png"),
    ],
)
def test_csv_unusable(tmp_path, lines, message):
    _png(tmp_path / "a.png")
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        index_csv(path)
    assert "bad.csv" in str(info.value) and "\n" not in str(info.value)


def test_csv_not_utf8_or_missing(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("path,label\ncaf\xe9.png,x\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv is not UTF-8"):
        index_csv(path)
    with pytest.raises(DataError, match="nope.csv does not exist"):
        index_csv(tmp_path / "nope.csv")


def test_csv_utf8_bom_header(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    path = tmp_path / "bom.csv"
    path.write_bytes("path,label\na.png,x\nb.png,y\n".encode("utf-8-sig"))
    assert index_csv(path, val_fraction=0.0).class_names == ("x", "y")


# --- split files ---
