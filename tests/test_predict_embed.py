"""predict, embed and probe on a fitted run: embeddings, precision, inputs, probes."""

import csv
import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.infer_fixtures import cli
from vision_ft.data.pipeline import eval_batches
from vision_ft.infer.embeddings import read_embeddings
from vision_ft.infer.predict import write_predictions
from vision_ft.infer.predictor import compiled_forward, from_run
from vision_ft.infer.probe_files import PROBE_FILE
from vision_ft.train.probe import LinearProbe


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
        dangling = tmp_path / ("embed-link.npz" if command[0] == "embed" else "predict-link.csv")
        dangling.symlink_to(tmp_path / "nowhere" / "x.npz")  # the file would be written at the end
        through_a_link = cli(*command, "--checkpoint", root / "run", "--output", dangling)
        assert through_a_link.exit_code == 2, through_a_link.output
        assert "which does not exist" in through_a_link.output and "Traceback" not in through_a_link.output
        assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


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
