"""eval on a small fitted run: consistency with fit, class matching, bad input and damaged runs."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.infer_fixtures import cli
from tests.train_fixtures import tiny_config
from vision_ft.data.errors import DataError
from vision_ft.infer.evaluate import evaluate_run, reorder_labels, run_class_order
from vision_ft.infer.predictor import from_run
from vision_ft.train.loop import FitRun


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


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs would reach for the bucket")
def test_a_run_kept_in_cloud_storage_this_install_cannot_reach_is_one_line(fitted, tmp_path):
    """eval, predict, embed and fit --pretrained run: on a run whose config.json names a gs://
    checkpoint_dir, without gcsfs installed: fsspec's ImportError traceback, exit code 1."""
    root, cfg, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "checkpoint_dir": "gs://bucket/run"}))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    commands = [
        ("eval", "--checkpoint", run),
        ("predict", "--checkpoint", run, "--input", image, "--output", tmp_path / "p.csv"),
        ("embed", "--checkpoint", run, "--data", cfg.data, "--output", tmp_path / "e.npz"),
        ("fit", "--pretrained", f"run:{run}", "--data", cfg.data, "--epochs", 1, "--output", tmp_path / "f"),
    ]
    for args in commands:
        result = cli(*args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1, (args[0], result.output, result.exception)
        assert errors[0].startswith("error: gs://bucket/run: ") and str(run / "config.json") in errors[0]


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


def test_a_run_missing_its_best_checkpoint_says_it_reads_the_latest(fitted, tmp_path, caplog):
    """With the best checkpoint gone (deleted, not copied along), eval, predict and embed read the
    latest weights without a word, and reported them as the run's chosen ones."""
    root, _, _ = fitted
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    with caplog.at_level("WARNING", logger="vision_ft.run"):
        from_run(run)
    assert not [r for r in caplog.records if r.name == "vision_ft.run"]
    for step in (run / "checkpoints" / "best").iterdir():
        shutil.rmtree(step)
    with caplog.at_level("WARNING", logger="vision_ft.run"):
        from_run(run)
    warned = [r.getMessage() for r in caplog.records if r.name == "vision_ft.run"]
    assert len(warned) == 1 and "no best checkpoint" in warned[0] and "latest" in warned[0], warned
