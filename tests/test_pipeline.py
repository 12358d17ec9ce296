"""The grain input pipeline: determinism, exact mid-epoch resume, host sharding, padding, bad images."""

import dataclasses
import multiprocessing
import os
import signal
import time

import jax
import numpy as np
import pytest
from PIL import Image

from vision_ft.data.errors import DataError
from vision_ft.data.files import FileSplit
from vision_ft.data.npz import ArraySplit
from vision_ft.data.pipeline import (
    Geometry,
    eval_batches,
    sharded_eval_batches,
    train_batches,
    unusable_reason,
)
from vision_ft.data.records import Record
from vision_ft.data.stats import band_statistics
from vision_ft.train.step import Augment, augment_batch, mix_batch

GEOMETRY = Geometry(8, "bilinear", 1.0, train_scale=(0.3, 1.0), channels=3)


def _array_split(n=40, side=12):
    rng = np.random.default_rng(0)
    return ArraySplit(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), np.arange(n) % 3)


def _steps(split, start, stop, **kw):
    args = dict(batch_size=8, seed=3, start_step=start, total_steps=stop, threads=2) | kw
    return list(train_batches(split, GEOMETRY, **args))


def test_train_stream_is_seeded_and_resumes_mid_epoch_exactly():
    split = _array_split()
    full = _steps(split, 0, 12)  # 5 steps per epoch: crosses two epoch boundaries
    assert len(full) == 12 and full[0]["image"].shape == (8, 8, 8, 3)
    again = _steps(split, 0, 12)
    resumed = _steps(split, 7, 12)
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(full[7:], resumed, strict=True):  # same examples and the same random crops
        np.testing.assert_array_equal(a["row"], b["row"])
        np.testing.assert_array_equal(a["image"], b["image"])
    other_seed = _steps(split, 0, 1, seed=4)
    assert not np.array_equal(other_seed[0]["row"], full[0]["row"])
    # each epoch visits distinct examples, in a new order, dropping the remainder
    epoch0 = np.concatenate([b["row"] for b in full[:5]])
    epoch1 = np.concatenate([b["row"] for b in full[5:10]])
    assert len(set(epoch0)) == 40 and len(set(epoch1)) == 40 and not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(full[0]["label"], split.labels[full[0]["row"]])
    assert full[0]["image"].dtype == np.float32 and 0 <= full[0]["image"].min() <= full[0]["image"].max() <= 1


def test_each_process_reads_its_own_slice_of_the_global_batch():
    split = _array_split()
    whole = _steps(split, 0, 3)
    halves = [_steps(split, 0, 3, process_index=i, process_count=2) for i in range(2)]
    for step in range(3):
        for key in ("row", "image"):
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_worker_processes_give_the_same_batches():
    split = _array_split()
    np.testing.assert_array_equal(_steps(split, 2, 4, workers=1)[1]["image"], _steps(split, 2, 4)[1]["image"])


def test_worker_processes_leave_a_ctrl_c_to_the_main_process():
    """A terminal's Ctrl-C reaches the whole process group: each worker printed a KeyboardInterrupt
    traceback and died, while the main process was finishing its step to save a checkpoint."""
    split = _array_split()
    batches = train_batches(split, GEOMETRY, batch_size=8, seed=3, start_step=0, total_steps=40, workers=1)
    expected = _steps(split, 0, 40)
    got = [next(batches)]
    workers = multiprocessing.active_children()
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(1)
    assert all(worker.is_alive() for worker in workers)
    got += list(batches)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


_WORKER_BATCHES_SCRIPT = """
import jax

from tests.test_pipeline import GEOMETRY, _array_split
from vision_ft.data.pipeline import eval_batches, prefetch_to_device, train_batches


def main():  # as the CLI runs a command: the batches are a function's, freed when it returns
    split = _array_split()
    for batch in eval_batches(split, GEOMETRY, batch_size=8, workers=2):
        pass
    batches = prefetch_to_device(
        train_batches(split, GEOMETRY, batch_size=8, seed=0, start_step=0, total_steps=20, workers=2),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )
    held = [next(batches) for _ in range(3)]  # a fit that stops early, holding its last batches
    batches.close()
    print("closed", len(held))


if __name__ == "__main__":
    main()
"""


def test_worker_batches_leave_no_shared_memory_behind(tmp_path):
    """Worker processes hand batches over in shared memory: after a fit with --workers, Python's
    resource tracker warned of "leaked shared_memory objects" (unlinks still queued at exit)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "worker_batches.py"
    script.write_text(_WORKER_BATCHES_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "closed" in out.stdout, out.stderr
    assert "leaked" not in out.stderr, out.stderr


def test_closing_the_train_stream_stops_its_workers():
    split = _array_split()
    batches = train_batches(split, GEOMETRY, batch_size=8, seed=3, start_step=0, total_steps=40, workers=1)
    next(batches)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()


def test_closing_an_evaluation_early_stops_its_workers():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    batches = sharded_eval_batches(_array_split(n=40), GEOMETRY, sharding, batch_size=8, workers=1)
    next(batches)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()


def test_eval_pads_the_last_batch_and_masks_it():
    split = _array_split(n=19)
    batches = list(eval_batches(split, GEOMETRY, batch_size=8))
    assert [int(b["mask"].sum()) for b in batches] == [8, 8, 3]
    rows = np.concatenate([b["row"] for b in batches])
    np.testing.assert_array_equal(rows[:19], np.arange(19))
    assert (rows[19:] == -1).all()
    # eval geometry is deterministic: a plain resize of the whole (square) image
    expected = np.asarray(Image.fromarray(split.images[4]).resize((8, 8), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(batches[0]["image"][4], expected, atol=1e-6)


def test_unreadable_files_are_flagged_not_fatal(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((10, 10, 3), 20 * i, np.uint8)).save(path)
        paths.append(path)
    paths[2].write_bytes(paths[2].read_bytes()[:30])  # truncated
    paths[4].write_bytes(b"")  # zero bytes
    # a greyscale photo among colour ones is read as RGB, as timm reads it, not dropped
    Image.fromarray(np.full((10, 10), 100, np.uint8)).save(paths[5])
    split = FileSplit([Record(str(p), i % 2) for i, p in enumerate(paths)])
    (batch,) = eval_batches(split, GEOMETRY, batch_size=6)
    np.testing.assert_array_equal(batch["bad"], [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(batch["mask"], [1, 1, 0, 1, 0, 1])
    np.testing.assert_allclose(batch["image"][3], 60 / 255, atol=1e-6)
    np.testing.assert_allclose(batch["image"][5], 100 / 255, atol=1e-6)
    mean, std, used = band_statistics(split, GEOMETRY)
    assert used == 4
    np.testing.assert_allclose(mean, [(0 + 20 + 60 + 100) / 4 / 255] * 3, rtol=1e-6)
    # a colour image in a greyscale dataset becomes its luma; other band counts stay unusable
    colour = np.zeros((2, 10, 10, 3), np.uint8)
    colour[..., 0] = 200
    (grey,) = eval_batches(
        ArraySplit(colour, np.zeros(2)), dataclasses.replace(GEOMETRY, channels=1), batch_size=2
    )
    np.testing.assert_allclose(grey["image"], round(0.299 * 200) / 255, atol=1e-6)
    two_bands = ArraySplit(np.zeros((2, 10, 10, 2), np.uint8), np.zeros(2))
    (batch,) = eval_batches(two_bands, GEOMETRY, batch_size=2)
    np.testing.assert_array_equal(batch["bad"], [1, 1])
    assert unusable_reason(two_bands, 0, GEOMETRY) == "has 2 bands, expected 3"


def test_an_error_about_every_file_stops_the_pipeline_instead_of_skipping_each():
    class NoCodec(ArraySplit):
        def load(self, index):
            raise DataError("x.dcm: decoding DICOM JPEG-LS needs a package that is not installed")

    split = NoCodec(np.zeros((2, 10, 10, 3), np.uint8), np.zeros(2))
    with pytest.raises(DataError, match="needs a package that is not installed"):
        next(eval_batches(split, GEOMETRY, batch_size=2))


def test_quarter_turns_flips_and_mixing():
    image = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1) / 32
    seen = set()
    for seed in range(16):
        out = np.asarray(augment_batch(image, jax.random.key(seed), Augment(hflip=False, rot90=True)))
        match = [k for k in range(4) if np.array_equal(out[0, ..., 0], np.rot90(image[0, ..., 0], k))]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {0, 1, 2, 3}
    targets = np.eye(2, dtype=np.float32)
    for aug in (Augment(mixup=0.4), Augment(cutmix=1.0)):
        mixed, soft, weights = mix_batch(image, targets, np.ones(2, np.float32), jax.random.key(0), aug)
        np.testing.assert_allclose(np.asarray(soft).sum(-1), 1.0, rtol=1e-6)
        lam = float(soft[0, 0])
        assert 0 <= lam <= 1
        if aug.cutmix:  # the pasted area is exactly 1 - lam of the image
            from_partner = np.mean(np.asarray(mixed)[0] == image[1])
            assert from_partner == pytest.approx(1 - lam, abs=1e-6)
        else:
            np.testing.assert_allclose(mixed[0], lam * image[0] + (1 - lam) * image[1], rtol=1e-5)


def test_real_medmnist_files_load_with_official_splits():
    from pathlib import Path

    from vision_ft.data.sources import load_dataset

    bundled = load_dataset("npz:bundled:breastmnist")
    assert {k: len(v) for k, v in bundled.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert bundled.channels == 1 and bundled.class_names == ("malignant", "normal/benign")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"
    if shared.exists():  # present on the project's machines, not shipped with the package
        pneumonia = load_dataset(f"npz:{shared}")
        assert len(pneumonia.splits["val"]) == 524 and len(pneumonia.splits["test"]) == 624
        assert np.bincount(pneumonia.splits["train"].labels).min() > 0


@pytest.mark.parametrize("bands", [1, 3])
def test_colour_jitter_matches_torchvision(bands):
    tf = pytest.importorskip("torchvision.transforms.functional")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(bands)
    images = rng.uniform(0, 1, (4, 8, 8, bands)).astype(np.float32)
    key, strength = jax.random.key(3), 0.4
    out = np.asarray(augment_batch(images, key, Augment(hflip=False, color_jitter=strength)))
    # augment_batch's fifth subkey draws the factors: brightness, contrast, saturation per image
    factors = np.asarray(
        jax.random.uniform(jax.random.split(key, 5)[4], (3, 4, 1, 1, 1), minval=0.6, maxval=1.4)
    ).reshape(3, 4)
    for i, image in enumerate(torch.from_numpy(images).permute(0, 3, 1, 2)):
        want = tf.adjust_contrast(tf.adjust_brightness(image, factors[0, i]), factors[1, i])
        if bands == 3:
            want = tf.adjust_saturation(want, factors[2, i])
        # torchvision's luma weights are 0.2989/0.587/0.114 against ITU-R 601's 0.299 here
        np.testing.assert_allclose(out[i], want.permute(1, 2, 0).numpy(), atol=1e-6 if bands == 1 else 2e-4)
    assert np.abs(out - images).max() > 0.05


def test_colour_jitter_leaves_other_band_counts_alone():
    images = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 4)).astype(np.float32)
    out = augment_batch(images, jax.random.key(0), Augment(hflip=False, color_jitter=0.4))
    np.testing.assert_array_equal(np.asarray(out), images)


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (333, 517), (300, 301)])
@pytest.mark.parametrize("interpolation, crop_pct", [("bicubic", 0.875), ("bilinear", 0.95)])
def test_eval_geometry_is_timms_resize_then_center_crop(height, width, interpolation, crop_pct):
    """One resize of a box, sampled where timm's two steps sample: at most PIL's uint8 rounding apart
    (a box off by half a pixel moved an edge by up to 0.49 here)."""
    timm_data = pytest.importorskip("timm.data")
    from vision_ft.data.pipeline import _prepare

    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[:, : width // 2] //= 3  # an edge, which a shifted crop moves
    transform = timm_data.create_transform(
        input_size=224, crop_pct=crop_pct, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1)
    )
    reference = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
    ours = _prepare(image, Geometry(224, interpolation, crop_pct, channels=3), None)
    np.testing.assert_allclose(ours, reference, atol=1e-6)  # exactly: resized, then cropped, on 8 bits


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (333, 517), (300, 301)])
@pytest.mark.parametrize(
    "crop_mode, crop_pct", [("squash", 1.0), ("squash", 0.9), ("border", 1.0), ("border", 0.9)]
)
def test_eval_geometry_follows_timms_crop_modes(height, width, crop_mode, crop_pct):
    """The 384 px ConvNeXts and other tags with crop_mode "squash" resize both sides (no image lost
    at crop_pct 1), "border" fits the longer side and pads with the mean; both as timm's transform,
    in the pipeline (a resize and a crop, or a resize and a pad) and in ``eval_transform`` (PIL's
    steps)."""
    timm_data = pytest.importorskip("timm.data")
    from vision_ft.data.pipeline import _prepare, eval_geometry
    from vision_ft.data.transforms import eval_transform
    from vision_ft.models.registry import PretrainedCfg

    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[:, : width // 2] //= 3  # an edge, which a shifted crop moves
    mean = (0.485, 0.456, 0.406)
    cfg = PretrainedCfg(
        "test", input_size=(3, 224, 224), interpolation="bicubic", crop_pct=crop_pct, crop_mode=crop_mode,
        mean=mean, std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    transform = timm_data.create_transform(
        input_size=224,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation="bicubic",
        mean=mean,
        std=(1, 1, 1),
    )
    reference = transform(Image.fromarray(image)).permute(1, 2, 0).numpy() + np.asarray(mean, np.float32)
    ours = _prepare(image, eval_geometry(cfg, 224, None, 3), None)
    assert ours.shape == (224, 224, 3)
    np.testing.assert_allclose(ours, reference, atol=1e-6)  # exactly: resized, then cropped, on 8 bits
    np.testing.assert_allclose(eval_transform(Image.fromarray(image), cfg) + mean, reference, atol=1e-6)
    # a fixed crop_pct keeps the center crop, whatever the model's mode
    assert eval_geometry(cfg, 224, 1.0, 3).eval_crop_mode == "center"


@pytest.mark.parametrize("height, width, crop_mode, crop_pct, grey", [
    (300, 451, "center", 0.875, False), (300, 123, "center", 0.875, False), (61, 97, "squash", 0.9, False),
    (175, 245, "center", 0.875, True), (300, 123, "border", 0.95, False),
])  # fmt: skip
def test_an_8_bit_image_file_is_prepared_exactly_as_timm_prepares_it(
    tmp_path, height, width, crop_mode, crop_pct, grey
):
    """8-bit files were decoded to float32 and resized in PIL's float mode, without timm's rounding
    to 8 bits and clipping: 0.6-4% off timm's inputs. And a non-square image's one boxed resize
    rounds otherwise than timm's resize-then-crop (up to 2 levels in a third of the pixels)."""
    timm_data = pytest.importorskip("timm.data")
    from vision_ft.data.decode import read_image
    from vision_ft.data.pipeline import eval_geometry, eval_image
    from vision_ft.models.registry import PretrainedCfg

    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 7 + y * 3) % 256, (y * 5) % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    image[: height // 3, : width // 2] = 255  # saturated: bicubic overshoots above 1 here
    pil = Image.fromarray(image).convert("L") if grey else Image.fromarray(image)
    pil.save(tmp_path / "photo.png")
    bands = 1 if grey else 3
    mean = (0.5,) * bands
    cfg = PretrainedCfg(
        "test", input_size=(bands, 224, 224), interpolation="bicubic", crop_pct=crop_pct, crop_mode=crop_mode,
        mean=mean, std=(1.0,) * bands,
    )  # fmt: skip
    transform = timm_data.create_transform(
        input_size=(bands, 224, 224), crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic",
        mean=mean, std=(1.0,) * bands,
    )  # fmt: skip
    reference = transform(Image.open(tmp_path / "photo.png")).permute(1, 2, 0).numpy() + np.float32(0.5)
    ours = eval_image(read_image(tmp_path / "photo.png"), eval_geometry(cfg, 224, None, bands))
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_border_pads_8_bit_images_with_the_rounded_mean_and_others_with_the_mean():
    """timm pads 8-bit pixels with round(255 x mean); 16-bit or float data (a CT window, dataset
    statistics of 0.0013) would be padded 0, far from its mean, if rounded the same way."""
    from vision_ft.data.pipeline import _prepare

    geometry = Geometry(8, "bilinear", 1.0, channels=1, eval_crop_mode="border", border_mean=(0.0013,))
    tall = np.full((16, 8, 1), 0.5, np.float32)  # fitted to 8 x 4, padded by 2 columns each side
    out = _prepare(tall, geometry, None)
    np.testing.assert_array_equal(out[:, :2], np.float32(0.0013))
    np.testing.assert_allclose(out[:, 2:6], 0.5)
    out = _prepare(np.full((16, 8, 1), 128, np.uint8), geometry, None)
    np.testing.assert_array_equal(out[:, :2], 0.0)  # round(255 x 0.0013) = 0
    with pytest.raises(ValueError, match="crop_mode must be one of center, squash, border"):
        Geometry(8, eval_crop_mode="letterbox")


@pytest.mark.parametrize("dtype, bands", [(np.uint16, 1), (np.uint16, 3), (np.uint8, 4), (np.int32, 2)])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_integer_pixels_come_out_on_one_scale_whether_resized_or_not(dtype, bands, crop_mode):
    """16-bit arrays (a TFDS feature) and 8-bit ones with more bands than PIL takes were resized in
    float32 at their raw values (0..65535) and only scaled to [0, 1] where no resize was needed, so a
    training crop and an evaluation of one image saw pixels 65535x apart."""
    from vision_ft.data.pipeline import _prepare

    full = np.iinfo(dtype).max
    image = np.random.default_rng(0).integers(full // 4, full // 2, (40, 50, bands), dtype=dtype)
    geometry = Geometry(32, "bilinear", 1.0, channels=bands, eval_crop_mode=crop_mode, border_mean=(0.3,))
    resized = _prepare(image, geometry, None)
    assert resized.dtype == np.float32 and 0.0 <= resized.min() and resized.max() <= 0.5 + 1e-6
    fitting = dataclasses.replace(geometry, img_size=40)
    unresized = _prepare(image[:, :40], fitting, None)  # 40 x 40 at crop_pct 1: no resize at all
    np.testing.assert_allclose(unresized, image[:, :40] / np.float32(full), rtol=1e-6)
    train = dataclasses.replace(geometry, train_scale=(0.5, 1.0))
    cropped = _prepare(image, train, np.random.default_rng(1))
    assert 0.25 - 1e-3 <= cropped.min() and cropped.max() <= 0.5 + 1e-6
