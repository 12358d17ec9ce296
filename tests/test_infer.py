"""embed, eval, predict and probe on a small fitted run: consistency with fit, exactness, determinism."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from tests.train_fixtures import tiny_config
from vision_ft.cli import main
from vision_ft.data.errors import DataError
from vision_ft.data.pipeline import eval_batches
from vision_ft.infer.embeddings import read_embeddings
from vision_ft.infer.evaluate import evaluate_run, reorder_labels, run_class_order
from vision_ft.infer.predict import write_predictions
from vision_ft.infer.predictor import compiled_forward, from_run
from vision_ft.infer.probe_files import PROBE_FILE
from vision_ft.train.loop import FitRun
from vision_ft.train.probe import LinearProbe


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    # shifted test-time views: eval and predict must evaluate as fit did (the run's config.json)
    cfg = tiny_config(root, epochs=2, ema_decay=0.5, tta_shift=0.1)
    final = FitRun(cfg, progress=False).run()
    return root, cfg, final


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_eval_reproduces_fit_test_metrics_and_writes_a_clinical_report(fitted):
    root, cfg, final = fitted
    result = cli("eval", "--checkpoint", root / "run")
    assert result.exit_code == 0, result.output
    report = json.loads((root / "run" / "eval-test" / "eval.json").read_text())
    assert report["precision"] == "fp32"  # full float32 unless --precision says otherwise
    for key in ("accuracy", "auc", "balanced_accuracy", "loss"):
        assert report["metrics"][key] == pytest.approx(final["test"][key], rel=1e-5, abs=1e-6), key
    ci = report["clinical"]["auc_ci"]
    assert ci["low"] <= report["metrics"]["auc"] <= ci["high"]
    # the report's AUC and interval as fit's test report has them (both from float64 probabilities)
    fitted_ci = final["test_clinical"]["auc_ci"]
    assert (ci["auc"], ci["low"], ci["high"]) == pytest.approx(
        (fitted_ci["auc"], fitted_ci["low"], fitted_ci["high"])
    )
    assert (root / "run" / "eval-test" / "test_reliability.png").read_bytes()[:4] == b"\x89PNG"
    again = cli("eval", "--checkpoint", root / "run")  # a second report never overwrites the first
    assert again.exit_code == 0 and (root / "run" / "eval-test-2" / "eval.json").exists()


def test_a_run_without_validation_is_evaluated_on_its_averaged_weights(tmp_path):
    # no val split, so no best checkpoint: eval falls back to the latest, and must use the EMA of the
    # weights there, as fit's own test evaluation did (not the raw trained weights); and its loss
    # weighs the classes as fit's did
    cfg = tiny_config(tmp_path, epochs=1, ema_decay=0.5, class_weights="auto")
    with np.load(cfg.data.removeprefix("npz:")) as full:
        no_val = {k: full[k] for k in full.files if not k.startswith("val_")}
    np.savez(tmp_path / "data.npz", **no_val)
    final = FitRun(cfg, progress=False).run()
    assert final["best_step"] is None and final["best_val"] is None
    weights = json.loads((tmp_path / "run" / "config.json").read_text())["loss_class_weights"]
    assert len(weights) == 2 and abs(weights[0] - weights[1]) > 0.05  # 96 random labels, uneven
    report = evaluate_run(tmp_path / "run")
    for key in ("accuracy", "auc", "loss"):
        assert report["metrics"][key] == pytest.approx(final["test"][key], rel=1e-5, abs=1e-6), key


def test_embeddings_are_the_pre_logits_and_bit_identical_run_to_run(fitted, tmp_path):
    root, cfg, _ = fitted
    first, second, table = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.parquet"
    for out in (first, second, table):
        result = cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--split", "val",
                     "--output", out, "--batch-size", 16, "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    a, b, c = read_embeddings(first), read_embeddings(second), read_embeddings(table)
    assert a.embeddings.shape == (32, 96) and a.embeddings.dtype == np.float32
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.embeddings, c.embeddings)
    np.testing.assert_array_equal(a.labels, c.labels)
    assert list(a.ids[:2]) == ["data.npz:val[0]", "data.npz:val[1]"]
    # exactly forward_head(forward_features(x), pre_logits=True) of the run's best weights
    predictor = from_run(root / "run")
    model, pcfg = predictor.model, predictor.model.pretrained_cfg
    batch = next(eval_batches(_val_split(cfg), predictor.geometry, batch_size=16))
    x = (jnp.asarray(batch["image"]) - jnp.asarray(pcfg.mean)) / jnp.asarray(pcfg.std)
    direct = np.asarray(model.forward_head(model.forward_features(x), pre_logits=True))
    np.testing.assert_allclose(a.embeddings[:16], direct, rtol=1e-5, atol=1e-6)
    exists = cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--output", first)
    assert exists.exit_code == 2 and "not overwriting" in exists.output
    # refused before the split is embedded, not when the result is written
    (tmp_path / "notes").write_text("a file")
    for command in (("embed", "--data", cfg.data), ("predict", "--input", cfg.data)):
        under_a_file = cli(*command, "--checkpoint", root / "run", "--output", tmp_path / "notes" / "x.npz")
        assert under_a_file.exit_code == 2, under_a_file.output
        assert "notes is a file, not a directory" in under_a_file.output


@pytest.mark.parametrize(
    "precision, arithmetic",
    [("fp32", {"HIGHEST"}), ("tf32", {"HIGH"}), ("bf16", {"DEFAULT"})],
)
def test_precision_sets_the_arithmetic_of_every_matmul_and_convolution(fitted, precision, arithmetic):
    # JAX's default on GPUs (TF32) and TPUs (one bf16 pass) would move fp32 outputs away from timm's;
    # on this CPU every choice computes alike, so the compiled program is what shows the difference
    root, _, _ = fitted
    predictor = from_run(root / "run", precision=precision)
    forward, _ = compiled_forward(predictor, "embedding")
    size, channels = predictor.geometry.img_size, predictor.channels
    program = forward.lower(np.zeros((8, size, size, channels), np.float32)).as_text()
    products = [line for line in program.splitlines() if "dot_general" in line or "convolution" in line]
    assert len(products) >= 4
    assert {p for line in products for p in re.findall(r"\b(HIGHEST|HIGH|DEFAULT)\b", line)} == arithmetic
    convolutions = [line for line in products if "stablehlo.convolution" in line]
    assert convolutions and all(("bf16>" in line) == (precision == "bf16") for line in convolutions)


def test_bf16_embeddings_are_close_to_fp32_and_say_how_they_were_made(fitted, tmp_path):
    root, cfg, _ = fitted
    outputs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npz"
        result = cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--split", "val",
                     "--output", out, "--precision", precision, "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[precision] = read_embeddings(out)
    fp32, bf16 = outputs["fp32"].embeddings, outputs["bf16"].embeddings
    assert bf16.dtype == np.float32 and outputs["bf16"].metadata["precision"] == "bf16"
    assert not np.array_equal(fp32, bf16)  # bf16 arithmetic happened
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99, cosine.min()


def _val_split(cfg):
    from vision_ft.data.sources import load_dataset

    return load_dataset(cfg.data).splits["val"]


def test_predict_lists_a_folder_as_the_folder_source_does(fitted, tmp_path):
    """predict's own walk knew images by suffix only and followed no symlinked folder: a DICOM named
    by its UID, or a folder linked in, gave "no image files in this folder"."""
    from tests.test_decode import _write_dicom

    root, _, _ = fitted
    scans = tmp_path / "scans"
    scans.mkdir()
    _write_dicom(scans / "1.2.840.113619.2.5", np.full((16, 16), 700, np.uint16))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "series").symlink_to(scans, target_is_directory=True)
    for folder, listed in ((scans, "1.2.840.113619.2.5"), (linked, "series/1.2.840.113619.2.5")):
        out = tmp_path / f"{folder.name}.csv"
        result = cli("predict", "--checkpoint", root / "run", "--input", folder, "--output", out)
        assert result.exit_code == 0, result.output
        assert [r["path"] for r in csv.DictReader(out.open())] == [str(folder / listed)]
    # options that would do nothing are refused, not dropped
    result = cli("predict", "--checkpoint", root / "run", "--input", scans, "--split", "val",
                 "--output", tmp_path / "split.csv")  # fmt: skip
    assert result.exit_code == 2 and "--split is for a --data spec" in result.output, result.output
    result = cli("embed", "--checkpoint", root / "run", "--pretrained", "false", "--data", "npz:x.npz",
                 "--output", tmp_path / "e.npz")  # fmt: skip
    assert result.exit_code == 2 and "--pretrained is for --model" in result.output, result.output


def test_predict_reads_a_tfds_input_from_its_data_dir(fitted, tmp_path):
    """predict took tfds: inputs but had no --data-dir, so it found only those in TFDS's default place."""
    from tests.test_tfds_source import TEST, _prepare

    root, _, _ = fitted
    _prepare(tmp_path / "tfds", "gray")
    out = tmp_path / "preds.csv"
    result = cli("predict", "--checkpoint", root / "run", "--input", "tfds:tiny_catalog/gray",
                 "--data-dir", tmp_path / "tfds", "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(csv.DictReader(out.open()))) == TEST


def test_predict_on_a_folder_and_on_a_spec(fitted, tmp_path):
    root, cfg, _ = fitted
    folder = tmp_path / "new"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(folder / f"scan{i}.png")
    (folder / "notes.txt").write_text("not an image")
    # a colour photo is read as its luma by the run's one-band model, as timm reads photos as RGB
    Image.fromarray(np.full((16, 16, 3), 60, np.uint8)).save(folder / "scan1_colour.png")
    five_bands = folder / "bands.tif"  # five bands measure something else: unusable
    tifffile.imwrite(
        five_bands, np.zeros((16, 16, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    out = tmp_path / "preds.csv"
    result = cli("predict", "--checkpoint", root / "run", "--input", folder, "--output", out, "--top-k", 2)
    assert result.exit_code == 0, result.output
    assert f"skipped unreadable image {five_bands}: has 5 bands, expected 1" in result.output
    rows = list(csv.DictReader(out.open()))
    names = ["scan0.png", "scan1.png", "scan1_colour.png", "scan2.png"]
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == names
    assert rows[1]["p_class 0"] == rows[2]["p_class 0"]
    alone = cli(
        "predict", "--checkpoint", root / "run", "--input", five_bands, "--output", tmp_path / "one.csv"
    )
    errors = [line for line in alone.output.splitlines() if line.startswith("error:")]
    assert alone.exit_code == 2, alone.output
    assert errors == [f"error: no readable images to predict: {five_bands}: has 5 bands, expected 1"]
    # a split whose every image is unusable: embed wrote an empty file and exited 0
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,split\nnew/scan0.png,a,train\nnew/scan2.png,b,train\nnew/broken.png,a,test\n"
    )
    empty = cli("embed", "--checkpoint", root / "run", "--data", f"csv:{manifest}", "--split", "test",
                "--output", tmp_path / "none.npz", "--no-progress")  # fmt: skip
    assert empty.exit_code == 2 and "error: no readable images to embed: " in empty.output, empty.output
    assert not (tmp_path / "none.npz").exists()
    before = sorted((root / "run").iterdir())  # eval left an empty report directory behind
    failed = cli("eval", "--checkpoint", root / "run", "--data", f"csv:{manifest}", "--split", "test")
    assert failed.exit_code == 2 and "error: no readable images to predict: " in failed.output, failed.output
    assert sorted((root / "run").iterdir()) == before
    for r in rows:
        assert float(r["p_class 0"]) + float(r["p_class 1"]) == pytest.approx(1.0, abs=1e-5)
        assert r["top2"].split("|")[0].split(":")[0] == r["predicted"]
    labelled = tmp_path / "test_preds.csv"
    assert (
        cli("predict", "--checkpoint", root / "run", "--input", cfg.data, "--output", labelled).exit_code == 0
    )
    rows = list(csv.DictReader(labelled.open()))
    assert len(rows) == 32 and {r["label"] for r in rows} <= {"class 0", "class 1"}
    # labels are named by the data's classes: a folder of some of the run's classes indexes them anew
    named = tmp_path / "named.csv"
    write_predictions(
        named, ["x", "y"], np.zeros((2, 3)), ("a", "b", "c"), labels=np.array([0, 1]), label_names=("a", "c")
    )
    assert [r["label"] for r in csv.DictReader(named.open())] == ["a", "c"]
    bad = cli(
        "predict", "--checkpoint", root / "run", "--input", tmp_path / "nope", "--output", tmp_path / "x.csv"
    )
    assert bad.exit_code == 2 and "nope" in bad.output


def test_linear_probe_and_knn_on_zoo_embeddings(fitted, tmp_path):
    root, cfg, _ = fitted
    paths = {}
    for split in ("train", "val", "test"):
        paths[split] = tmp_path / f"{split}.npz"
        result = cli("embed", "--model", "test_resnet", "--pretrained", "false", "--data", cfg.data,
                     "--split", split, "--output", paths[split], "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    out = tmp_path / "probe"
    result = cli(
        "probe", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--output", out
    )
    assert result.exit_code == 0, result.output
    final = json.loads((out / "final.json").read_text())
    assert set(final) >= {"best_val", "test", "wall_seconds", "linear", "knn"}
    assert final["test"]["count"] == 32 and final["knn"]["k"] >= 1
    preds = tmp_path / "probe_preds.csv"
    result = cli("predict", "--probe", out, "--input", cfg.data, "--output", preds)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(preds.open()))
    accuracy = np.mean([r["label"] == r["predicted"] for r in rows])
    assert accuracy == pytest.approx(final["test"]["accuracy"], abs=1e-9)


def test_probe_on_a_runs_embeddings_predicts_as_it_was_scored(fitted, tmp_path):
    root, cfg, _ = fitted
    paths = {}
    for split in ("train", "val", "test"):
        paths[split] = tmp_path / f"{split}.npz"
        result = cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--split", split,
                     "--output", paths[split], "--tta", "flip", "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    out = tmp_path / "probe"
    result = cli(
        "probe", "--train", paths["train"], "--val", paths["val"], "--test", paths["test"], "--output", out
    )
    assert result.exit_code == 0, result.output
    preds = tmp_path / "probe_preds.csv"
    result = cli("predict", "--probe", out, "--input", cfg.data, "--output", preds)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(preds.open()))
    # predict embeds as the probe's embeddings were made (mirrors only, not the run's shifted views)
    logits = LinearProbe.load(out / PROBE_FILE).logits(read_embeddings(paths["test"]).embeddings)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    got = np.array([[float(r["p_class 0"]), float(r["p_class 1"])] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_bad_input_is_one_line_exit_2(fitted, tmp_path):
    root, cfg, _ = fitted
    np.savez(tmp_path / "junk.npz", something=np.zeros(3))
    (tmp_path / "empty").mkdir()
    kept = tmp_path / "notes.txt"  # what an --output naming the user's file must leave alone
    kept.write_text("mine")
    embeddings = tmp_path / "val.npz"
    assert cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--split", "val",
               "--output", embeddings, "--no-progress").exit_code == 0  # fmt: skip
    ids = np.array([f"x{i}" for i in range(4)])
    np.savez(tmp_path / "flat.npz", embeddings=np.zeros(4, np.float32), labels=np.zeros(4, int), ids=ids)
    np.savez(tmp_path / "listed.npz", embeddings=np.zeros((4, 3), np.float32), labels=np.zeros(4, int),
             ids=ids, metadata="[1, 2]")  # fmt: skip
    np.savez(
        tmp_path / "short.npz", embeddings=np.zeros((4, 3), np.float32), labels=np.zeros(3, int), ids=ids
    )
    for name, text in (("not_json", "probe"), ("a_list", "[]"), ("no_source", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "probe.json").write_text(text)
        (tmp_path / name / "probe.npz").write_bytes(b"")
    cases = [
        (("eval", "--checkpoint", tmp_path / "empty"), "no config.json"),
        # these three raised IndexError, AttributeError or a train_y length error
        (("probe", "--train", tmp_path / "flat.npz", "--val", embeddings, "--output", tmp_path / "p"),
         "flat.npz: embeddings of shape (4,), not (examples, dimensions)"),
        (("probe", "--train", embeddings, "--val", tmp_path / "listed.npz", "--output", tmp_path / "p"),
         "listed.npz: its metadata is not a JSON object"),
        (("probe", "--train", tmp_path / "short.npz", "--val", embeddings, "--output", tmp_path / "p"),
         "short.npz: 4 embeddings, labels of shape (3,) and ids of shape (4,); they must be one per example"),
        # these three an unnamed JSON error, KeyError or AttributeError
        (("predict", "--probe", tmp_path / "not_json", "--input", cfg.data, "--output", tmp_path / "o.csv"),
         f"{tmp_path / 'not_json' / 'probe.json'}: unreadable"),
        (("predict", "--probe", tmp_path / "a_list", "--input", cfg.data, "--output", tmp_path / "o.csv"),
         "a_list/probe.json: not the metadata of a probe's embeddings"),
        (("predict", "--probe", tmp_path / "no_source", "--input", cfg.data, "--output", tmp_path / "o.csv"),
         "no_source/probe.json: names no checkpoint, and misses pretrained, zoo_model, in_chans"),
        (("probe", "--train", tmp_path / "junk.npz", "--val", tmp_path / "junk.npz",
          "--output", tmp_path / "p"), "not an embeddings file"),
        (("predict", "--probe", tmp_path / "empty", "--input", cfg.data, "--output", tmp_path / "o.csv"),
         "not a probe directory"),
        (("embed", "--model", "resnet18", "--checkpoint", root / "run", "--data", cfg.data,
          "--output", tmp_path / "e.npz"), "exactly one of"),
        (("embed", "--model", "resnet18", "--data", cfg.data, "--output", tmp_path / "e.txt"),
         ".npz or .parquet"),
        (("eval", "--checkpoint", root / "run", "--split", "holdout"), "holdout"),
        # numpy would call any file that is not an archive "pickled data"
        (("probe", "--train", kept, "--val", embeddings, "--output", tmp_path / "p"), "not an .npz archive"),
        (("eval", "--checkpoint", root / "run", "--output", kept), f"--output {kept} is a file"),
        (("eval", "--checkpoint", root / "run", "--output", kept / "report"), "cannot be created"),
        (("probe", "--train", embeddings, "--val", embeddings, "--output", kept),
         f"--output {kept} is a file"),
        (("eval", "--checkpoint", root / "run", "--batch-size", 0), "--batch-size"),
        (("embed", "--checkpoint", root / "run", "--data", cfg.data, "--batch-size", 0,
          "--output", tmp_path / "e0.npz"), "--batch-size"),
        (("predict", "--checkpoint", root / "run", "--input", cfg.data, "--top-k", 0,
          "--output", tmp_path / "k0.csv"), "--top-k"),
    ]  # fmt: skip
    for args, culprit in cases:
        result = cli(*args)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(lines) == 1 and culprit in lines[0], (args, result.output)
    assert kept.read_text() == "mine"


def test_intermediate_layer_embeddings(fitted, tmp_path):
    root, cfg, _ = fitted
    outputs = {}
    for layer in (None, 1, -1):
        out = tmp_path / f"layer{layer}.npz"
        extra = () if layer is None else ("--layer", layer)
        result = cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--split", "val",
                     "--output", out, "--no-progress", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[layer] = read_embeddings(out).embeddings
    assert outputs[1].shape == (32, 48)  # test_resnet's second stage
    # ResNet's pre-logits are the global average of the last stage
    np.testing.assert_allclose(outputs[-1], outputs[None], rtol=1e-5, atol=1e-6)
    bad = cli("embed", "--checkpoint", root / "run", "--data", cfg.data, "--layer", 4,
              "--output", tmp_path / "x.npz", "--no-progress")  # fmt: skip
    assert bad.exit_code == 2 and "4 stages" in bad.output


def test_eval_data_classes_are_matched_to_the_run_by_name():
    run = ("benign", "malignant", "normal")
    assert run_class_order("d", run, run) is None
    assert run_class_order("d", ("class 0", "class 1", "class 2"), run) is None  # unnamed: by position
    order = run_class_order("d", ("normal", "benign", "malignant"), run)
    np.testing.assert_array_equal(reorder_labels(np.array([0, 1, 2, -1]), order), [2, 0, 1, -1])
    multi_hot = np.array([[1, 0, 0], [0, 1, 1]], np.uint8)
    np.testing.assert_array_equal(reorder_labels(multi_hot, order), [[0, 0, 1], [1, 1, 0]])
    with pytest.raises(DataError, match="has classes benign, cyst, normal; the run was trained on benign"):
        run_class_order("d", ("benign", "cyst", "normal"), run)
    with pytest.raises(DataError, match="has 2 classes; the run was trained on 3"):
        run_class_order("d", ("benign", "normal"), run)


def test_a_damaged_checkpoint_is_one_error_line_and_exit_2(fitted, tmp_path):
    root, _, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    chunks = [p for p in (run / "checkpoints" / "best").rglob("d/*") if p.is_file()]
    assert chunks
    for chunk in chunks:  # truncated, as a full disk or an interrupted copy leaves them
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    # a subprocess: Orbax's abandoned reads report themselves as the process ends
    result = subprocess.run(
        [sys.executable, "-m", "vision_ft.cli", "eval", "--checkpoint", str(run)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr  # was 1, with Orbax's traceback
    assert len(errors) == 1 and f"{run}/checkpoints/best" in errors[0], result.stderr
    assert "could not be read (damaged?)" in errors[0]
    # nor the dozens of tracebacks of the reads Orbax abandoned
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr, result.stderr


def test_a_run_is_resized_for_inference_as_its_validation_was(fitted, tmp_path):
    """fit records the crop mode its validation and test used; eval, predict and embed take it (a
    run written before it was recorded center-cropped, whatever its model's own crop_mode)."""
    import shutil

    root, _, _ = fitted
    config = json.loads((root / "run" / "config.json").read_text())
    assert config["eval_crop_mode"] == "center"
    copy = tmp_path / "run"
    shutil.copytree(root / "run", copy)
    for recorded, expected in (("squash", "squash"), (None, "center")):
        edited = {**config, "eval_crop_pct": None, "eval_crop_mode": recorded}
        if recorded is None:
            del edited["eval_crop_mode"]
        (copy / "config.json").write_text(json.dumps(edited))
        assert from_run(copy).geometry.eval_crop_mode == expected


def test_eval_names_an_empty_split_instead_of_unreadable_images(fitted, tmp_path):
    root, _, _ = fitted
    for c in ("a", "b"):  # 2 x 4 images: the default val_fraction 0.1 leaves val empty
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    result = cli("eval", "--checkpoint", root / "run", "--data", f"folder:{tmp_path}", "--split", "val")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and errors == [
        f"error: --split val: the val split of folder:{tmp_path} is empty (no examples)"
    ], result.output


def test_an_eval_that_fails_leaves_no_directory_it_made(fitted, tmp_path, monkeypatch):
    """Only the report directory itself was removed: a new parent of it stayed behind, empty."""
    import vision_ft.infer.evaluate as evaluate

    def unreadable(*args, **kwargs):
        raise DataError("an image could not be read")

    monkeypatch.setattr(evaluate, "predict_logits", unreadable)
    root, _, _ = fitted
    result = cli("eval", "--checkpoint", root / "run", "--output", tmp_path / "reports" / "test")
    assert result.exit_code == 2 and "could not be read" in result.output, result.output
    assert not (tmp_path / "reports").exists()


def test_eval_counts_the_rows_left_out_while_reading_the_data_as_fit_does(fitted, tmp_path):
    """fit's final.json counts a CSV row naming a missing file; eval.json left it out."""
    root, _, _ = fitted
    lines = ["path,label"]
    for i in range(12):
        Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{i % 2}")
    lines.append("gone.png,1")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    result = cli("eval", "--checkpoint", root / "run", "--data", f"csv:{tmp_path / 'list.csv'}", "--split",
                 "train", "--output", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    bad = json.loads((out / "eval.json").read_text())["bad_examples"]
    assert bad["count"] == 1 and list(bad["examples"]) == [str(tmp_path / "gone.png")], bad


def test_rows_left_out_of_a_split_are_reported_with_that_split_only(fitted, tmp_path):
    """eval --split test listed a missing train row among its bad examples, and predict and embed
    dropped the missing rows of their split without a word."""
    root, _, _ = fitted
    lines = ["path,label,split"]
    for i in range(12):
        Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{i % 2},{'train' if i < 8 else 'test'}")
    lines += ["gone_train.png,1,train", "gone_test.png,0,test"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    spec = f"csv:{tmp_path / 'list.csv'}"
    result = cli("eval", "--checkpoint", root / "run", "--data", spec, "--split", "test", "--output",
                 tmp_path / "report")  # fmt: skip
    assert result.exit_code == 0, result.output
    bad = json.loads((tmp_path / "report" / "eval.json").read_text())["bad_examples"]
    assert bad["count"] == 1 and list(bad["examples"]) == [str(tmp_path / "gone_test.png")], bad
    result = cli("predict", "--checkpoint", root / "run", "--input", spec, "--output", tmp_path / "p.csv")
    assert result.exit_code == 0 and "gone_test.png" in result.output, result.output
    assert "gone_train.png" not in result.output
    result = cli("embed", "--checkpoint", root / "run", "--data", spec, "--split", "train", "--output",
                 tmp_path / "e.npz", "--no-progress")  # fmt: skip
    assert result.exit_code == 0 and "gone_train.png" in result.output, result.output
    assert "gone_test.png" not in result.output


def test_a_tilde_in_an_option_s_path_is_the_home_directory(fitted, tmp_path, monkeypatch):
    """With --checkpoint=~/run the shell leaves "~" alone: eval read the run from $HOME but wrote its
    report into ./~/run, embed recorded .../~/run as the checkpoint, and fit wrote into ./~."""
    root, cfg, _ = fitted
    home = tmp_path / "home"
    shutil.copytree(root / "run", home / "run")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    result = cli("eval", "--checkpoint=~/run", "--output=~/report")
    assert result.exit_code == 0, result.output
    assert (home / "report" / "eval.json").is_file() and not (tmp_path / "~").exists()
    relative = "npz:" + os.path.relpath(cfg.data.removeprefix("npz:"))  # recorded absolute, as runs are
    result = cli("embed", "--checkpoint=~/run", "--data", relative, "--split", "val", "--output=~/val.npz")
    assert result.exit_code == 0, result.output
    with np.load(home / "val.npz") as embedded:
        metadata = json.loads(str(embedded["metadata"]))
    assert metadata["checkpoint"] == str(home / "run") and metadata["data"] == cfg.data
    args = ["fit", "--model", "test_resnet", "--pretrained", "false", "--data", cfg.data, "--img-size", "32",
            "--epochs", "1", "--batch-size", "16", "--no-progress", "--output=~/fitted"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert (home / "fitted" / "final.json").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize(
    "edit, culprit",
    [
        (lambda c: c.pop("data"), "records no data"),
        (lambda c: c.update(eval_crop_pct="x"), "eval_crop_pct"),
        (lambda c: c.update(class_names=5), "class_names"),
        (lambda c: c["pretrained_cfg"].update(mean=[0.5, 0.5, 0.5]), "pretrained_cfg mean"),
        (lambda c: c.update(tta_shift=None), None),  # unset: no shifted views, as before they existed
    ],
)
def test_a_damaged_run_config_is_named_in_one_line(fitted, tmp_path, edit, culprit):
    """A hand-edited or damaged config.json stopped eval on a KeyError, TypeError or JAX traceback."""
    root, _, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    result = cli("eval", "--checkpoint", run)
    if culprit is None:
        assert result.exit_code == 0, result.output
        return
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and culprit in errors[0], result.output
    assert str(run / "config.json") in errors[0] or "--data" in errors[0]


def test_eval_checks_the_split_when_data_names_the_runs_own(fitted, tmp_path, monkeypatch):
    root, cfg, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == cfg.data
    # as if the data had gained images since the fit: its test split is no longer the run's
    config["split_sizes"] = {**config["split_sizes"], "train": config["split_sizes"]["train"] - 1}
    (run / "config.json").write_text(json.dumps(config))
    data = Path(cfg.data.removeprefix("npz:"))
    monkeypatch.chdir(data.parent)
    # --data skipped the check, and so did the run's own data spelled otherwise
    for extra in ((), ("--data", cfg.data), ("--data", f"npz:./{data.name}")):
        result = cli("eval", "--checkpoint", run, *extra)
        assert result.exit_code == 2 and "no longer splits as the run" in result.output, result.output
    # predict and embed on the run's data redrew the split silently: "test" scores then held
    # images the run trained on
    for command in (
        ("predict", "--checkpoint", run, "--input", f"npz:./{data.name}", "--output", tmp_path / "p.csv"),
        ("embed", "--checkpoint", run, "--data", cfg.data, "--split", "test", "--output", tmp_path / "e.npz"),
    ):
        result = cli(*command)
        assert result.exit_code == 2 and "no longer splits as the run" in result.output, result.output


def test_predict_with_a_probe_checks_the_split_of_the_run_it_embeds_with(fitted, tmp_path):
    """predict --probe skipped the check --checkpoint makes: with the run's data split otherwise since,
    "test" predictions held images the run and the probe were fitted on."""
    root, cfg, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    paths = {}
    for split in ("train", "val"):
        paths[split] = tmp_path / f"{split}.npz"
        result = cli("embed", "--checkpoint", run, "--data", cfg.data, "--split", split,
                     "--output", paths[split], "--no-progress")  # fmt: skip
        assert result.exit_code == 0, result.output
    probe_dir = tmp_path / "probe"
    result = cli("probe", "--train", paths["train"], "--val", paths["val"], "--output", probe_dir)
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    config["split_sizes"] = {**config["split_sizes"], "train": config["split_sizes"]["train"] - 1}
    (run / "config.json").write_text(json.dumps(config))
    result = cli("predict", "--probe", probe_dir, "--input", cfg.data, "--output", tmp_path / "p.csv")
    assert result.exit_code == 2 and "no longer splits as the run" in result.output, result.output
    assert not (tmp_path / "p.csv").exists()
