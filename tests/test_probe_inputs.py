"""embed, probe and predict on inputs that are small, empty, mixed up or otherwise unusual: each a
result or one error line with exit code 2, and nothing the user had overwritten."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.train_fixtures import write_synthetic_npz
from vision_ft.cli import main
from vision_ft.data.errors import DataError
from vision_ft.data.sources import DataOptions
from vision_ft.infer.embeddings import EmbeddingFileError, Embeddings, read_embeddings, write_embeddings
from vision_ft.infer.predict import resolve_input
from vision_ft.infer.predictor import embedding_dim, from_pretrained
from vision_ft.infer.probe_files import PROBE_FILE, SOURCE_FILE
from vision_ft.train.probe import LinearProbe
from vision_ft.weights.sources import recorded_pretrained

ZOO = ("--model", "test_resnet", "--pretrained", "false", "--batch-size", 8, "--no-progress")


# what embed records of a zoo model's embeddings (see cli/inference.py _metadata)
MADE_BY = {
    "source": "test_resnet (False)", "model": "ResNet", "input_size": [3, 32, 32],
    "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center", "mean": [0.5] * 3,
    "std": [0.25] * 3, "class_names": None, "data": "folder:/images", "split": "train", "tta": "none",
    "layer": None, "dataset_classes": ["cat", "dog"], "multi_label": False, "checkpoint": None,
    "zoo_model": "test_resnet", "pretrained": "false", "in_chans": 3, "precision": "fp32",
}  # fmt: skip


def blob_file(path, split: str, n: int, seed: int, ids=None, **metadata):
    """Two separable blobs of 4-dimensional embeddings, as embed writes them; ``metadata`` overrides
    ``MADE_BY``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = (rng.normal(size=(n, 4)) + 3 * labels[:, None]).astype(np.float32)
    ids = np.asarray(ids if ids is not None else [f"/images/{split}/{i}.png" for i in range(n)])
    write_embeddings(path, Embeddings(x, labels, ids, {**MADE_BY, "split": split, **metadata}))
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """2 classes x 4 images: the default val_fraction 0.1 leaves the val split empty."""
    root = tmp_path_factory.mktemp("small") / "images"
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((16, 16, 3), 30 * i + 100 * c, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_an_empty_split_is_left_out_of_all_and_named_when_asked_for(small_folder, tmp_path):
    spec = f"folder:{small_folder}"
    out = tmp_path / "all.npz"
    result = cli("embed", *ZOO, "--data", spec, "--split", "all", "--output", out)
    assert result.exit_code == 0, result.output  # was a numpy concatenate traceback, exit 1
    written = read_embeddings(out)
    assert written.embeddings.shape[0] == 8 and written.labels.shape == (8,)
    empty = cli("embed", *ZOO, "--data", spec, "--split", "val", "--output", tmp_path / "val.npz")
    assert empty.exit_code == 2 and error_lines(empty) == [
        f"error: --split val: the val split of {spec} is empty (no examples)"
    ], empty.output
    assert not (tmp_path / "val.npz").exists()
    with pytest.raises(DataError, match="the val split of .* is empty"):
        resolve_input(spec, DataOptions(), "val")


def test_multi_label_rows_embed_with_an_empty_split(small_folder, tmp_path):
    manifest = tmp_path / "labels.csv"
    # stratified on each row's first label, 4 and 4 as the folder: val is empty again
    rows = [f"{p},{'dog|cat' if p.parent.name == 'dog' else 'cat'}" for p in small_folder.rglob("*.png")]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "all.npz"
    result = cli("embed", *ZOO, "--data", f"csv:{manifest}", "--split", "all", "--output", out)
    assert result.exit_code == 0, result.output  # zeros(0) labels met (N, 2) multi-hot ones
    assert read_embeddings(out).labels.shape == (8, 2)


def test_the_probe_refuses_files_made_another_way(tmp_path):
    train = blob_file(tmp_path / "train.npz", "train", 40, 0)
    # each file's own data spec, split and precision do not change what a feature means
    val = blob_file(tmp_path / "val.npz", "val", 20, 1, data="folder:/elsewhere", precision="bf16")
    assert cli("probe", "--train", train, "--val", val, "--output", tmp_path / "ok").exit_code == 0
    cases = {
        "tta": "flip",
        "layer": 2,
        "pretrained": "true",
        "mean": [0.485, 0.456, 0.406],
        "crop_pct": 1.0,
        "dataset_classes": ["dog", "cat"],  # label 0 would mean another class
    }
    for key, value in cases.items():
        other = blob_file(tmp_path / f"val_{key}.npz", "val", 20, 1, **{key: value})
        result = cli("probe", "--train", train, "--val", other, "--output", tmp_path / f"p_{key}")
        assert result.exit_code == 2 and error_lines(result) == [
            f"error: {other}: {key} {value!r}, but {MADE_BY[key]!r} in the train file {train}; a probe "
            "needs embeddings made the same way"
        ], (key, result.output)
        assert not (tmp_path / f"p_{key}").exists()
    # one source however a file recorded it (embed kept --pretrained as typed; a run's path through ..)
    (tmp_path / "run").mkdir()
    same = {"pretrained": ("False", "false"), "checkpoint": (str(tmp_path / "run"), f"{tmp_path}/run/../run")}
    for key, (recorded, again) in same.items():
        first = blob_file(tmp_path / f"train_{key}.npz", "train", 40, 0, **{key: recorded})
        second = blob_file(tmp_path / f"val_same_{key}.npz", "val", 20, 1, **{key: again})
        result = cli("probe", "--train", first, "--val", second, "--output", tmp_path / f"same_{key}")
        assert result.exit_code == 0, (key, result.output)
    test = blob_file(tmp_path / "test.npz", "test", 20, 2, checkpoint="/runs/other")
    result = cli("probe", "--train", train, "--val", val, "--test", test, "--output", tmp_path / "p")
    assert result.exit_code == 2 and f"{test}: checkpoint '/runs/other'" in result.output, result.output


def test_predict_refuses_a_probe_the_model_cannot_feed(small_folder, tmp_path):
    predictor = from_pretrained("test_resnet", False)
    assert embedding_dim(predictor) == 96 and embedding_dim(predictor, 1) == 48  # as embed writes them
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / SOURCE_FILE).write_text(json.dumps(MADE_BY))
    five = LinearProbe(np.zeros((5, 2), np.float32), np.zeros(2, np.float32), np.zeros(5, np.float32),
                       np.ones(5, np.float32), 0.1, ("cat", "dog"))  # fmt: skip
    five.save(probe_dir / PROBE_FILE)
    out = tmp_path / "preds.csv"
    result = cli("predict", "--probe", probe_dir, "--input", small_folder, "--output", out)
    assert result.exit_code == 2 and error_lines(result) == [
        f"error: --probe {probe_dir}: its probe takes embeddings of dimension 5, but test_resnet (False) "
        "gives 96"
    ], result.output  # was a traceback, exit 1, after embedding every image
    assert not out.exists()
    (probe_dir / SOURCE_FILE).write_text(json.dumps({**MADE_BY, "layer": 7}))
    result = cli("predict", "--probe", probe_dir, "--input", small_folder, "--output", out)
    assert result.exit_code == 2 and error_lines(result) == [
        f"error: {probe_dir / SOURCE_FILE}: layer 7: this model has 4 stages/blocks (0..3)"
    ], result.output


@pytest.mark.parametrize(
    "field, value, what",
    [
        ("in_chans", "3", "a positive channel count"),
        ("in_chans", True, "a positive channel count"),
        ("checkpoint", 5, "a run directory"),
        ("zoo_model", ["test_resnet"], "a model name"),
        ("layer", "x", "a stage or block index"),
        ("dataset_classes", 5, "a list of class names"),
    ],
)
def test_metadata_of_the_wrong_type_is_named_in_embeddings_and_probe_files(
    small_folder, tmp_path, field, value, what
):
    """A hand-edited field failed later as a traceback: in the probe (len() of an int), or in predict
    --probe (a str channel count divided)."""
    train = blob_file(tmp_path / "train.npz", "train", 40, 0, **{field: value})
    val = blob_file(tmp_path / "val.npz", "val", 20, 1)
    result = cli("probe", "--train", train, "--val", val, "--output", tmp_path / "probe")
    assert error_lines(result) == [f"error: {train}: metadata {field} {value!r} is not {what}"], result.output
    assert result.exit_code == 2 and not (tmp_path / "probe").exists()
    probe_dir = tmp_path / "made"
    probe_dir.mkdir()
    (probe_dir / SOURCE_FILE).write_text(json.dumps({**MADE_BY, field: value}))
    LinearProbe(np.zeros((96, 2), np.float32), np.zeros(2, np.float32), np.zeros(96, np.float32),
                np.ones(96, np.float32), 0.1, ("cat", "dog")).save(probe_dir / PROBE_FILE)  # fmt: skip
    out = tmp_path / "preds.csv"
    result = cli("predict", "--probe", probe_dir, "--input", small_folder, "--output", out)
    culprit = f"error: {probe_dir / SOURCE_FILE}: metadata {field} {value!r} is not {what}"
    assert error_lines(result) == [culprit], result.output
    assert result.exit_code == 2 and not out.exists()


def test_the_probe_refuses_val_or_test_examples_it_is_fitted_on(tmp_path):
    val_ids = [f"/images/val/{i}.png" for i in range(20)]
    everything = [f"/images/train/{i}.png" for i in range(30)] + val_ids[:10]  # embed --split all
    train = blob_file(tmp_path / "all.npz", "all", 40, 0, ids=everything)
    val = blob_file(tmp_path / "val.npz", "val", 20, 1, ids=val_ids)
    result = cli("probe", "--train", train, "--val", val, "--output", tmp_path / "p")
    assert result.exit_code == 2 and error_lines(result) == [
        f"error: {val}: 10 of its 20 examples are in the train file {train} too (first: "
        "/images/val/0.png); a probe must be scored on examples it was not fitted on"
    ], result.output
    test = blob_file(tmp_path / "test.npz", "test", 20, 2, ids=everything[5:25])
    clean = blob_file(tmp_path / "clean.npz", "val", 20, 1, ids=[f"/new/{i}.png" for i in range(20)])
    result = cli("probe", "--train", train, "--val", clean, "--test", test, "--output", tmp_path / "p")
    assert result.exit_code == 2 and f"error: {test}: 20 of its 20 examples" in result.output
    # npz: ids number the rows of their own file: train[3] of two arrays are two images
    rows = [f"train[{i}]" for i in range(40)]
    train = blob_file(tmp_path / "a.npz", "train", 40, 0, ids=rows, data="npz:a.npz")
    other = blob_file(tmp_path / "b.npz", "train", 20, 1, ids=rows[:20], data="npz:b.npz")
    assert cli("probe", "--train", train, "--val", other, "--output", tmp_path / "ok").exit_code == 0
    same = blob_file(tmp_path / "a_val.npz", "all", 20, 1, ids=rows[:20], data="npz:a.npz")
    result = cli("probe", "--train", train, "--val", same, "--output", tmp_path / "p")
    assert result.exit_code == 2 and "20 of its 20 examples are in the train file" in result.output


def test_the_probe_compares_every_pair_of_files_and_each_file_however_spelled(tmp_path, monkeypatch):
    """val and test were never compared (a test file that was the val file scored the probe on what
    chose its L2 and k), and npz:./a.npz was taken for another file than npz:a.npz."""
    monkeypatch.chdir(tmp_path)
    train = blob_file(tmp_path / "train.npz", "train", 40, 0, ids=[f"/t/{i}.png" for i in range(40)])
    val = blob_file(tmp_path / "val.npz", "val", 20, 1, ids=[f"/v/{i}.png" for i in range(20)])
    result = cli("probe", "--train", train, "--val", val, "--test", val, "--output", tmp_path / "p")
    assert result.exit_code == 2 and error_lines(result) == [
        f"error: {val}: 20 of its 20 examples are in the val file {val} too (first: /v/0.png); the test "
        "split must hold examples that chose none of the probe's settings"
    ], result.output
    rows = [f"a.npz:train[{i}]" for i in range(40)]
    train = blob_file(tmp_path / "a.npz", "train", 40, 0, ids=rows, data="npz:a.npz")
    same = blob_file(tmp_path / "a_val.npz", "all", 20, 1, ids=rows[:20], data="npz:./a.npz")
    result = cli("probe", "--train", train, "--val", same, "--output", tmp_path / "p")
    assert result.exit_code == 2 and "20 of its 20 examples are in the train file" in result.output


def probe_dir_for(path, class_names, dim: int = 96, **metadata):
    """A probe directory as ``probe`` writes it, for test_resnet's embeddings."""
    path.mkdir()
    (path / SOURCE_FILE).write_text(json.dumps({**MADE_BY, **metadata}))
    weights = np.random.default_rng(0).normal(size=(dim, len(class_names))).astype(np.float32)
    LinearProbe(weights, np.zeros(len(class_names), np.float32), np.zeros(dim, np.float32),
                np.ones(dim, np.float32), 0.1, tuple(class_names)).save(path / PROBE_FILE)  # fmt: skip
    return path


def test_predict_names_labels_and_predictions_alike(small_folder, tmp_path):
    unnamed = write_synthetic_npz(tmp_path / "arrays.npz", sizes=(8, 8, 8), channels=3)
    named_probe = probe_dir_for(tmp_path / "named", ("cat", "dog"))
    unnamed_probe = probe_dir_for(tmp_path / "unnamed", ("class 0", "class 1"))
    cases = [(named_probe, f"npz:{unnamed}", "test"), (unnamed_probe, f"folder:{small_folder}", "train")]
    for probe_dir, data, split in cases:
        out = tmp_path / f"{probe_dir.name}.csv"
        result = cli("predict", "--probe", probe_dir, "--input", data, "--split", split, "--output", out)
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader(out.open()))
        # the label column said "class 0" where the predictions said "cat" (or the other way round)
        assert {r["label"] for r in rows} == {"cat", "dog"}, (data, rows[0])
        assert {r["predicted"] for r in rows} <= {"cat", "dog"} and "p_cat" in rows[0]


def test_embed_records_a_weights_file_by_its_absolute_path(small_folder, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    from tests.parity import save_checkpoint

    weights = save_checkpoint(timm.create_model("test_resnet"), tmp_path, "weights")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "train.npz"
    result = cli("embed", *ZOO[:2], "--pretrained", weights.name, "--data", f"folder:{small_folder}",
                 "--output", out, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    # predict --probe loads these weights again, perhaps from another directory
    assert read_embeddings(out).metadata["pretrained"] == str(weights)
    assert recorded_pretrained("True") == "true" and recorded_pretrained("hf-hub:timm/x") == "hf-hub:timm/x"


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_a_failed_write_leaves_no_file_to_block_the_rerun(tmp_path, monkeypatch, suffix):
    data = Embeddings(np.ones((3, 4), np.float32), np.arange(3), np.asarray(["a", "b", "c"]), {"k": 1})
    path = tmp_path / f"e{suffix}"

    def disk_full(*args, **kwargs):  # a first few bytes written, then the disk is full
        where = args[-1]  # savez(file, ...) and write_table(table, where)
        if hasattr(where, "write"):
            where.write(b"PK\x03\x04")
        else:
            Path(where).write_bytes(b"PAR1")
        raise OSError(28, "No space left on device")

    if suffix == ".npz":
        monkeypatch.setattr(np, "savez", disk_full)
    else:
        import pyarrow.parquet as pq

        monkeypatch.setattr(pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_embeddings(path, data)
    assert not path.exists()
    monkeypatch.undo()
    write_embeddings(path, data)
    assert read_embeddings(path).metadata == {"k": 1}


def test_multi_label_files_are_named_as_such_before_any_comparison(tmp_path):
    path = tmp_path / "multi.npz"
    multi_hot = np.array([[1, 0], [0, 1], [1, 1]])
    write_embeddings(path, Embeddings(np.ones((3, 4), np.float32), multi_hot, np.asarray(["a", "b", "c"]),
                                      {**MADE_BY, "multi_label": True}))  # fmt: skip
    result = cli("probe", "--train", path, "--val", path, "--output", tmp_path / "p")
    assert result.exit_code == 2 and "multi-label embeddings" in result.output, result.output


def test_parquet_output_without_pyarrow_fails_before_any_embedding(tmp_path, monkeypatch):
    import sys

    import vision_ft.cli.inference as commands

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError

    def load_model(*args):
        raise AssertionError("the model was loaded before pyarrow was looked for")

    monkeypatch.setattr(commands, "_predictor", load_model)
    result = cli("embed", *ZOO, "--data", "npz:x.npz", "--output", tmp_path / "e.parquet")
    assert result.exit_code == 2 and error_lines(result) == [
        "error: parquet output needs pyarrow: pip install pyarrow"
    ], result.output


def test_the_probe_refuses_empty_files_and_a_train_file_predict_cannot_use(tmp_path):
    train = blob_file(tmp_path / "train.npz", "train", 40, 0)
    val = blob_file(tmp_path / "val.npz", "val", 20, 1)
    empty = tmp_path / "empty.npz"
    write_embeddings(empty, Embeddings(np.zeros((0, 4), np.float32), np.zeros(0, int), np.zeros(0, str), {}))
    for args, culprit in (
        ((empty, val), empty),  # was "error: max() arg is an empty sequence" with all three empty
        ((train, empty), empty),
        ((empty, empty), empty),
    ):
        result = cli("probe", "--train", args[0], "--val", args[1], "--output", tmp_path / "p")
        assert result.exit_code == 2 and error_lines(result) == [
            f"error: {culprit}: no examples in this embeddings file"
        ], result.output
    result = cli("probe", "--train", train, "--val", val, "--test", empty, "--output", tmp_path / "p")
    assert result.exit_code == 2 and f"error: {empty}: no examples" in result.output
    for name, metadata in (("bare", {}), ("no_weights", {**MADE_BY, "pretrained": None})):
        made_elsewhere = tmp_path / f"{name}.npz"
        copy = read_embeddings(train)
        write_embeddings(made_elsewhere, Embeddings(copy.embeddings, copy.labels, copy.ids, metadata))
        result = cli("probe", "--train", made_elsewhere, "--val", val, "--output", tmp_path / "p")
        missing = "pretrained, zoo_model, in_chans" if name == "bare" else "pretrained"
        assert result.exit_code == 2 and error_lines(result) == [
            f"error: {made_elsewhere}: its metadata names no checkpoint, and misses {missing}; predict "
            "could not embed new images as it was made (use files from vision-ft embed)"
        ], result.output
        assert not (tmp_path / "p").exists()


def test_the_knn_report_gives_the_loss_of_its_own_sweep_row(tmp_path):
    rng = np.random.default_rng(0)
    axes = np.eye(4, dtype=np.float32)

    def file(name, labels, directions):
        x = axes[directions] + 0.01 * rng.normal(size=(len(labels), 4)).astype(np.float32)
        ids = np.asarray([f"/images/{name}/{i}.png" for i in range(len(labels))])
        write_embeddings(tmp_path / name, Embeddings(x, np.asarray(labels), ids, MADE_BY))
        return tmp_path / name

    labels = np.arange(40) % 2
    train = file("train.npz", labels, labels)
    # one class-0 example among class 1's: no neighbour votes for its class at k=1, which is chosen
    # (every k is as accurate, and ties go to the smaller k)
    val = file("val.npz", labels[:20], np.where(np.arange(20) == 0, 1, labels[:20]))
    result = cli("probe", "--train", train, "--val", val, "--output", tmp_path / "p")
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "p" / "final.json").read_text())
    knn = final["knn"]
    assert knn["k"] == 1 and knn["best_val"]["accuracy"] == 0.95
    row = next(r for r in knn["k_sweep"] if r["k"] == knn["k"])
    assert knn["best_val"]["loss"] == pytest.approx(row["loss"], rel=1e-6)


def test_predict_input_folders_skip_hidden_folders_and_files(tmp_path):
    folder = tmp_path / "new"
    (folder / "visit2").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / "visit2" / ".cache").mkdir()
    image = Image.fromarray(np.zeros((8, 8), np.uint8))
    hidden = (".ipynb_checkpoints/a-checkpoint.png", "visit2/.cache/b.png", ".c.png")
    for name in ("a.png", "visit2/b.png", *hidden):
        image.save(folder / name)
    examples, label_names, _ = resolve_input(str(folder), DataOptions(), None)
    assert label_names is None
    assert [examples.example_id(i) for i in range(len(examples))] == [
        str(folder / "a.png"),
        str(folder / "visit2" / "b.png"),
    ]


def test_an_embeddings_path_that_is_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(EmbeddingFileError, match=f"embeddings file {tmp_path} is a directory, not a file"):
        read_embeddings(tmp_path)  # said "does not exist"


def _rewritten(path, **arrays):
    """``path``'s embeddings file written again with some arrays replaced, as a user's own code might."""
    e = read_embeddings(path)
    fields = {"embeddings": e.embeddings, "labels": e.labels, "ids": e.ids, **arrays}
    np.savez(path, **fields, metadata=np.asarray(json.dumps(e.metadata)))
    return path


def _with_row_3(values, value):
    return np.where(np.arange(len(values)) == 3, value, values)


@pytest.mark.parametrize(
    "role, damage, culprit",
    [
        ("train", lambda e: {"labels": (e.labels * 0.6)}, "label 0.6 is not a whole class index"),
        (
            "val",
            lambda e: {"labels": _with_row_3(e.labels * 1.0, np.inf)},
            "label inf is not a whole class index",
        ),
        (
            "train",
            lambda e: {"labels": _with_row_3(e.labels, 5)},
            "label 5 at row 3 is outside the 2 classes",
        ),
        ("val", lambda e: {"labels": _with_row_3(e.labels, 5)}, "label 5 at row 3 is outside the 2 classes"),
        (
            "train",
            lambda e: {"labels": _with_row_3(e.labels, -1)},
            "(label -1 at row 3) cannot train a probe",
        ),
        (
            "val",
            lambda e: {"labels": _with_row_3(e.labels, -1)},
            "(label -1 at row 3) cannot evaluate a probe",
        ),
        (
            "val",
            lambda e: {"embeddings": np.where(np.arange(len(e))[:, None] == 3, np.nan, e.embeddings)},
            "1 of 20 embeddings hold NaN or inf (first: row 3)",
        ),
        (
            "val",
            lambda e: {"embeddings": np.concatenate([e.embeddings, e.embeddings[:, :1]], axis=1)},
            "embeddings have dimension 5, expected 4",
        ),
    ],
)
def test_the_probe_names_the_file_whose_labels_or_values_it_cannot_use(tmp_path, role, damage, culprit):
    """Float labels were truncated (0.6 became class 0), a label beyond the classes added classes of
    its own, and the rest were refused naming an array (``val_x``) instead of the file."""
    files = {
        "train": blob_file(tmp_path / "train.npz", "train", 40, 0),
        "val": blob_file(tmp_path / "val.npz", "val", 20, 1),
    }
    _rewritten(files[role], **damage(read_embeddings(files[role])))
    result = cli("probe", "--train", files["train"], "--val", files["val"], "--output", tmp_path / "probe")
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert line.startswith(f"error: {files[role]}: ") and culprit in line, line
    assert not (tmp_path / "probe").exists()


def test_labels_beyond_the_train_file_s_classes_are_refused_in_files_made_elsewhere(tmp_path):
    train = blob_file(tmp_path / "train.npz", "train", 40, 0, dataset_classes=None)
    val = _rewritten(blob_file(tmp_path / "val.npz", "val", 20, 1, dataset_classes=None),
                     labels=_with_row_3(np.arange(20) % 2, 2))  # fmt: skip
    result = cli("probe", "--train", train, "--val", val, "--output", tmp_path / "probe")
    assert error_lines(result) == [f"error: {val}: label 2 at row 3 is outside the train file's classes 0-1"]
    whole = _rewritten(val, labels=(np.arange(20) % 2).astype(np.float64))  # 1.0 is class 1
    assert read_embeddings(whole).labels.dtype == np.int64
    assert cli("probe", "--train", train, "--val", whole, "--output", tmp_path / "ok").exit_code == 0
