"""`fit` end to end on every --data kind: JPEG folders, 13-band GeoTIFFs, DICOM through a CSV, TFDS;
bad images skipped and reported, or fatal with a one-line error; per-band statistics."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from tests.test_decode import _write_dicom
from tests.test_tfds_source import _prepare
from tests.train_fixtures import tiny_config
from vision_ft.data.errors import BadImageError, DataError
from vision_ft.data.pipeline import Geometry
from vision_ft.data.sources import DataOptions, load_dataset
from vision_ft.data.stats import band_statistics
from vision_ft.train.loop import FitRun
from vision_ft.train.run_dir import RunDirError

CLASSES = ("AnnualCrop", "Forest", "River")


def _eurosat_folder(root, per_class=12, side=20):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
            image[..., c] += 150  # each class dominated by one colour channel
            Image.fromarray(image).save(root / name / f"{name}_{i}.jpg", quality=95)
    return root


def _fit(tmp_path, data, **overrides):
    cfg = tiny_config(tmp_path, data=data, epochs=1, batch_size=8, eval_batch_size=8, **overrides)
    run = FitRun(cfg, progress=False)
    return run, run.run()


def test_jpeg_folder_with_a_corrupted_file(tmp_path):
    root = _eurosat_folder(tmp_path / "eurosat")
    broken = root / "Forest" / "Forest_3.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    # the folder's first image is greyscale, as a few are in most photo collections: the data stays
    # RGB and that image is read as RGB, not dropped (nor every colour image after it)
    first = root / "AnnualCrop" / "AnnualCrop_0.jpg"
    Image.open(first).convert("L").save(first)
    run, final = _fit(tmp_path, f"folder:{root}", val_fraction=0.25, test_fraction=0.25)
    assert run.data.class_names == CLASSES and run.data.channels == 3
    assert run.augment_settings["random_crop"] and run.augment_settings["color_jitter"] > 0  # natural
    assert final["bad_examples"]["count"] == 1
    assert str(broken) in final["bad_examples"]["examples"]
    rows = (tmp_path / "run" / "splits.csv").read_text().splitlines()
    assert rows[0].startswith("path,label,split") and len(rows) == 1 + 36
    assert {row.split(",")[1] for row in rows[1:]} == set(CLASSES)  # reads back as --data csv:
    assert final["test"]["confusion_matrix"] and np.sum(final["test"]["confusion_matrix"]) in (8, 9)


def test_resume_on_changed_data_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    root = _eurosat_folder(tmp_path / "eurosat", per_class=6)
    settings = dict(data=f"folder:{root}", epochs=1, batch_size=8, eval_batch_size=8, val_fraction=0.25)
    FitRun(tiny_config(tmp_path, **settings), progress=False).run()
    recorded = (tmp_path / "run" / "splits.csv").read_bytes()
    config = (tmp_path / "run" / "config.json").read_bytes()
    (root / "River" / "River_0.jpg").rename(root / "River" / "River_9.jpg")
    # eval drew the split again from the changed folder, unchecked: its "val" could hold training images
    from vision_ft.data.errors import DataError
    from vision_ft.infer.evaluate import evaluate_run

    expected = r"no longer splits as the run .* \(images added, removed or moved\); evaluate the run's own"
    with pytest.raises(DataError, match=expected + r" split with --data csv:\S+/splits\.csv$"):
        evaluate_run(tmp_path / "run", split="val")
    own = evaluate_run(tmp_path / "run", data=f"csv:{tmp_path / 'run' / 'splits.csv'}", split="val")
    val_size = json.loads(config)["split_sizes"]["val"]
    assert own["metrics"]["count"] in (val_size, val_size - 1)  # River_0 is gone, if it was in val
    changes = [
        ("a file renamed", lambda: None, "no longer splits as the run's"),
        ("an image added", lambda: shutil.copy(root / "Forest" / "Forest_0.jpg", root / "Forest" / "new.jpg"),
         r"splits into \{'train': \d+.*\} images"),
        ("a class renamed", lambda: (root / "River").rename(root / "Rivers"), r"has classes \[.*'Rivers'\]"),
    ]  # fmt: skip
    for change, make, message in changes:
        make()
        with pytest.raises(RunDirError, match=message):
            FitRun(tiny_config(tmp_path, resume=True, **settings), progress=False)
        assert (tmp_path / "run" / "splits.csv").read_bytes() == recorded, change
        assert (tmp_path / "run" / "config.json").read_bytes() == config, change


def test_a_run_made_when_classes_sorted_as_text_resumes_and_evaluates(tmp_path, monkeypatch):
    """Folder classes "1", "2", "10" now take indices in that order; a run recorded with the text
    order ("1", "10", "2") was refused on --resume, and its flat folder's split, drawn again class by
    class, made eval call the folder changed."""
    from vision_ft.data import records
    from vision_ft.infer.evaluate import evaluate_run
    from vision_ft.train.config import load_config

    rng = np.random.default_rng(0)
    root = tmp_path / "digits"
    for c, name in enumerate(("1", "2", "10")):
        (root / name).mkdir(parents=True)
        for i in range(8 + 2 * c):
            Image.fromarray(rng.integers(0, 80, (16, 16), np.uint8) + 60 * c).save(root / name / f"{i}.png")
    cfg = tiny_config(
        tmp_path, data=f"folder:{root}", epochs=2, batch_size=8, eval_batch_size=8, val_fraction=0.25,
        test_fraction=0.25,
    )  # fmt: skip
    with monkeypatch.context() as earlier_release:
        earlier_release.setattr(records, "class_name_key", lambda name: name)
        made = FitRun(cfg, progress=False).run()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["class_names"] == ["1", "10", "2"]
    evaluated = evaluate_run(tmp_path / "run", split="val")
    assert (
        evaluated["metrics"]["count"]
        == json.loads((tmp_path / "run" / "config.json").read_text())["split_sizes"]["val"]
    )
    resumed = FitRun(load_config(None, {**cfg.to_dict(), "resume": True}), progress=False)
    assert resumed.data.class_names == ("1", "10", "2")
    assert resumed.run()["test"]["auc"] == pytest.approx(made["test"]["auc"])  # a finished run: scored again


def test_multispectral_geotiffs_get_their_own_band_statistics(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "s2"
    for c, name in enumerate(CLASSES[:2]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            bands = rng.integers(500, 3000, (13, 16, 16), dtype=np.uint16)
            bands[7] += 20000 * c  # the NIR band separates the classes
            tifffile.imwrite(root / name / f"tile_{i}.tif", bands, planarconfig="separate")
    spec = f"folder:{root}"
    run, final = _fit(tmp_path, spec)
    assert run.model.pretrained_cfg.input_size[0] == 13
    assert run.augment_settings["rot90"] and run.augment_settings["vflip"]  # overhead preset
    dataset = load_dataset(spec)
    # resized as the model resizes (test_resnet: bilinear)
    geometry = Geometry(32, run.model.pretrained_cfg.interpolation, 1.0, channels=13)
    expected, _, _ = band_statistics(dataset.splits["train"], geometry)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["pretrained_cfg"]
    np.testing.assert_allclose(saved["mean"], expected, rtol=1e-6)
    assert saved["mean"][7] > 5 * saved["mean"][0]  # not ImageNet's statistics
    out = subprocess.run(
        [sys.executable, "-m", "vision_ft.cli", "stats", "--data", spec, "--img-size", "32",
         "--model", run.cfg.model],
        capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"}, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "13 bands" in out.stdout.splitlines()[0]
    np.testing.assert_allclose(yaml.safe_load(out.stdout)["mean"], expected, rtol=1e-6)


def test_dicom_through_a_csv_manifest(tmp_path):
    rng = np.random.default_rng(2)
    lines = ["path,label"]
    (tmp_path / "scans").mkdir()
    for i in range(24):
        label = ("normal", "nodule")[i % 2]
        pixels = rng.integers(0, 1500, (16, 16)).astype(np.uint16)
        pixels[4:12, 4:12] += 2000 * (i % 2)
        _write_dicom(tmp_path / "scans" / f"{i}.dcm", pixels, window=(1500, 3000), rescale=(1.0, -1024.0))
        lines.append(f"scans/{i}.dcm,{label}")
    lines.append("scans/missing.dcm,normal")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    run, final = _fit(tmp_path, f"csv:{tmp_path / 'manifest.csv'}", window=(1000.0, 3000.0))
    assert run.data.class_names == ("nodule", "normal") and run.data.channels == 1
    assert run.augment_settings["translate"] > 0 and not run.augment_settings["random_crop"]  # medical
    assert any("missing.dcm" in path for path in final["bad_examples"]["examples"])
    assert final["best_val"] is not None


def test_tfds_dataset_prepared_here(tmp_path):
    data_dir = tmp_path / "tfds"
    _prepare(data_dir, "rgb")
    run, final = _fit(tmp_path, "tfds:tiny_catalog/rgb", data_dir=str(data_dir), val_fraction=0.2)
    assert run.data.class_names == ("annual_crop", "forest", "river")
    assert len(run.data.splits["train"]) + len(run.data.splits["val"]) == 30
    assert len(run.data.splits["test"]) == 6 and final["test"] is not None


def test_on_bad_image_fail_is_one_line_exit_2(tmp_path):
    root = _eurosat_folder(tmp_path / "eurosat", per_class=6)
    for i in range(1, 6):  # more than the examples a one-epoch run leaves unread
        (root / "River" / f"River_{i}.jpg").write_bytes(b"")
    cmd = [
        sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--data", f"folder:{root}",
        "--model", "test_resnet", "--pretrained", "false", "--img-size", "32", "--epochs", "1",
        "--batch-size", "8", "--on-bad-image", "fail", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "River_" in errors[0] and "Traceback" not in out.stderr
    assert "on_bad_image: fail" in errors[0]


def test_on_bad_image_fail_stops_on_a_csv_row_naming_a_missing_file(tmp_path, caplog):
    """Rows left out while the CSV is indexed (missing file, unknown label) were counted in final.json
    but neither logged nor fatal, even with on_bad_image: fail."""
    root = _eurosat_folder(tmp_path / "eurosat", per_class=4)
    rows = [f"{path},{path.parent.name}" for path in sorted(root.rglob("*.jpg"))]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(["path,label", *rows, f"{root}/Forest/gone.jpg,Forest"]) + "\n")
    cfg = tiny_config(
        tmp_path, data=f"csv:{manifest}", epochs=1, batch_size=8, on_bad_image="fail", val_fraction=0.25
    )
    with pytest.raises(BadImageError, match=r"gone\.jpg: .*\(on_bad_image: fail\)"):
        FitRun(cfg, progress=False)
    with caplog.at_level("WARNING", logger="vision_ft"):
        FitRun(dataclasses.replace(cfg, on_bad_image="skip", output=str(tmp_path / "skip")), progress=False)
    assert any("gone.jpg" in record.getMessage() for record in caplog.records)


def test_the_band_count_is_read_across_the_split_not_from_its_first_class(tmp_path):
    """A folder lists its classes one after another: with a grey first class, every one of the eight
    images sampled was grey, the data was declared 1-band and every colour photo reduced to luma."""
    rng = np.random.default_rng(0)
    for name, shape in (("a_grey", (12, 12)), ("b_colour", (12, 12, 3))):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    assert load_dataset(f"folder:{tmp_path}").channels == 3


def test_the_band_count_does_not_depend_on_the_seed(tmp_path):
    """The sample was drawn from the seeded training split: with a few colour photos among grey ones,
    seeds 0-5 declared 3, 3, 1, 1, 3, 1 bands (a grey model or an RGB one, by the seed)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(30):
            grey = rng.integers(0, 255, (12, 12), dtype=np.uint8)
            Image.fromarray(grey).save(tmp_path / name / f"{i:02d}.png")
    for i in range(3):
        colour = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(colour).save(tmp_path / "b" / f"1{i}x.png")
    channels = {
        seed: load_dataset(f"folder:{tmp_path}", DataOptions(seed=seed)).channels for seed in range(6)
    }
    assert len(set(channels.values())) == 1, channels


def test_a_drawn_split_left_empty_is_refused_before_training(tmp_path):
    """Four images a class give a 0.1 validation share nothing (round(0.4) = 0): the fit trained a
    whole epoch, then stopped on a traceback evaluating the empty split, its run half-written."""
    root = _eurosat_folder(tmp_path / "eurosat", per_class=4)
    cfg = tiny_config(tmp_path, data=f"folder:{root}", epochs=1, batch_size=8, val_fraction=0.1)
    refused = r"the val split of folder:.* is empty .*--val-fraction 0\.1 .* 5 images"
    with pytest.raises(DataError, match=refused):
        FitRun(cfg, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    cfg = dataclasses.replace(cfg, val_fraction=0.25, test_fraction=0.1)
    with pytest.raises(DataError, match=r"the test split .* is empty .*--test-fraction 0\.1 "):
        FitRun(cfg, progress=False)


def test_unusable_images_met_before_a_resume_are_still_reported(tmp_path, monkeypatch):
    """A resumed run started its list of unusable images afresh: one that failed while finishing
    (rerun by the same command) reported none of the images its training had skipped."""
    root = _eurosat_folder(tmp_path / "eurosat", per_class=8)
    broken = root / "River" / "River_2.jpg"
    broken.write_bytes(b"")
    finish = FitRun._finish

    def fails_once(self, *args, **kwargs):
        monkeypatch.setattr(FitRun, "_finish", finish)
        raise MemoryError("while finishing")

    monkeypatch.setattr(FitRun, "_finish", fails_once)
    cfg = tiny_config(tmp_path, data=f"folder:{root}", epochs=1, batch_size=8, val_fraction=0.0)
    with pytest.raises(MemoryError):
        FitRun(cfg, progress=False).run()
    final = FitRun(cfg, progress=False).run()  # the same command finishes the run
    assert final["bad_examples"]["count"] == 1 and str(broken) in final["bad_examples"]["examples"]
