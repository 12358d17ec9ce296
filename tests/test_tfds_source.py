"""tfds_source on a tiny TFDS dataset prepared here, in array_record, without TensorFlow.

The builder class is created with ``skip_registration=True`` so nothing leaks into the TFDS registry:
``tfds.builder("tiny_catalog/...")`` then finds the prepared files in ``data_dir`` and reads them through
TFDS's read-only builder, as it would for a dataset prepared on another machine. Images are handed to TFDS
as PNG bytes because encoding a NumPy array would need TensorFlow.
"""

from __future__ import annotations

import io
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from vision_ft.data import tfds_source  # noqa: E402
from vision_ft.data.errors import BadImageError, DataError  # noqa: E402
from vision_ft.data.tfds_source import TfdsSpec, load_tfds, parse_tfds_spec  # noqa: E402

CLASSES = ["annual_crop", "forest", "river"]
TRAIN, TEST, VALIDATION = 30, 6, 9


def _pixels(config: str, split: str, i: int) -> np.ndarray:
    """A distinct image per example: pixel [0, 0] encodes split and index, the rest varies with both."""
    offset = {"train": 0, "test": 100, "validation": 200}[split]
    channels = 1 if config == "gray" else 3
    rng = np.random.default_rng(offset + i)
    image = rng.integers(0, 256, (16, 16, channels), dtype=np.uint8)
    image[0, 0, 0] = offset + i
    return image


def _bands(i: int, channels: int) -> np.ndarray:
    return np.full((4, 4, channels), i + 0.5, np.float32)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


class TinyCatalog(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """rgb: train/test; gray: train/validation/test, grayscale; bands: no 'image', two float tensors;
    plane: a single-band uint16 Tensor of rank 2; trainonly: rgb with only a train split, as EuroSAT."""

    # TFDS looks for a checksums file beside a builder defined in a package and, for that, imports
    # `importlib_resources`, which it only requires on Python < 3.9; a one-part module name skips the lookup.
    __module__ = "tiny_catalog"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=n) for n in ("rgb", "gray", "bands", "plane", "trainonly")
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config.name
        if config == "bands":
            pixels = {
                "sar": tfds.features.Tensor(shape=(4, 4, 2), dtype=np.float32),
                "optical": tfds.features.Tensor(shape=(4, 4, 5), dtype=np.float32),
            }
        elif config == "plane":
            pixels = {"elevation": tfds.features.Tensor(shape=(6, 6), dtype=np.uint16)}
        else:
            pixels = {"image": tfds.features.Image(shape=(16, 16, 1 if config == "gray" else 3))}
        features = {**pixels, "name": tfds.features.Text(), "land": tfds.features.ClassLabel(names=CLASSES)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        splits = (
            {"train": TRAIN} if self.builder_config.name == "trainonly" else {"train": TRAIN, "test": TEST}
        )
        if self.builder_config.name == "gray":
            splits["validation"] = VALIDATION
        return {split: self._generate_examples(split, n) for split, n in splits.items()}

    def _generate_examples(self, split, n):
        for i in range(n):
            example = {"name": f"{split}-{i}", "land": i % len(CLASSES)}
            if self.builder_config.name == "bands":
                example |= {"sar": _bands(i, 2), "optical": _bands(i, 5)}
            elif self.builder_config.name == "plane":
                example["elevation"] = np.full((6, 6), 1000 + i, np.uint16)
            else:
                example["image"] = _png(_pixels(self.builder_config.name, split, i))
            yield f"{split}-{i}", example


def _prepare(data_dir, config: str) -> None:
    builder = TinyCatalog(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    for config in ("rgb", "gray", "bands", "plane", "trainonly"):
        _prepare(root, config)
    return str(root)


def _expected_by_marker(config: str, split: str, n: int) -> dict[int, tuple[np.ndarray, int]]:
    return {int(_pixels(config, split, i)[0, 0, 0]): (_pixels(config, split, i), i % 3) for i in range(n)}


def test_parse_spec():
    assert parse_tfds_spec("eurosat") == TfdsSpec("eurosat", None, None)
    assert parse_tfds_spec("eurosat/rgb") == TfdsSpec("eurosat", "rgb", None)
    assert parse_tfds_spec("tfds:eurosat/rgb:train[:80%]") == TfdsSpec("eurosat", "rgb", "train[:80%]")
    assert parse_tfds_spec("so2sat:train+test") == TfdsSpec("so2sat", None, "train+test")
    for bad in ("", "eurosat/", "a/b/c", "eurosat:", "euro sat", "eurosat/rgb:2.0.0"):
        with pytest.raises(DataError, match="tfds:"):
            parse_tfds_spec(bad)


def test_train_test_and_carved_val_round_trip_exactly(data_dir):
    splits, class_names = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=3)
    assert class_names == tuple(CLASSES)
    assert set(splits) == {"train", "val", "test"}
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (24, 6, TEST)

    expected = _expected_by_marker("rgb", "train", TRAIN)
    seen_ids = set()
    for name in ("train", "val"):
        for i in range(len(splits[name])):
            example = splits[name][i]
            image, label = expected.pop(int(example["image"][0, 0, 0]))
            assert example["image"].dtype == np.uint8 and example["image"].shape == (16, 16, 3)
            np.testing.assert_array_equal(example["image"], image)
            assert example["label"] == label and isinstance(example["label"], int)
            assert example["id"].startswith("tiny_catalog/rgb:train[") and example["id"] not in seen_ids
            seen_ids.add(example["id"])
    assert expected == {}  # train and val together are exactly the TFDS train split

    test_expected = _expected_by_marker("rgb", "test", TEST)
    for i in range(TEST):
        example = splits["test"][i]
        image, label = test_expected.pop(int(example["image"][0, 0, 0]))
        np.testing.assert_array_equal(example["image"], image)
        assert example["label"] == label
    assert splits["test"][0]["id"] == "tiny_catalog/rgb:test[0]"
    assert splits["test"][-1]["id"] == f"tiny_catalog/rgb:test[{TEST - 1}]"
    with pytest.raises(IndexError):
        splits["test"][TEST]


def _ids(split) -> list[str]:
    return [split[i]["id"] for i in range(len(split))]


def test_carved_val_is_stratified_deterministic_and_disjoint(data_dir):
    first, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=3)
    again, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=3)
    other, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=4)
    assert _ids(first["val"]) == _ids(again["val"]) and _ids(first["train"]) == _ids(again["train"])
    assert _ids(first["val"]) != _ids(other["val"])
    assert not set(_ids(first["val"])) & set(_ids(first["train"]))
    # 10 per class, 20% each: exactly 2 of every class (a random split of 6 from 30 rarely is)
    for split in (first, other):
        val_labels = [split["val"][i]["label"] for i in range(len(split["val"]))]
        assert np.bincount(val_labels, minlength=3).tolist() == [2, 2, 2]


def test_large_dataset_falls_back_to_seeded_random_val(data_dir, monkeypatch):
    monkeypatch.setattr(tfds_source, "_STRATIFY_MAX_BYTES", 0)
    monkeypatch.setattr(
        tfds_source, "_read_labels", lambda *a: pytest.fail("labels read for a large dataset")
    )
    first, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=5)
    again, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=5)
    assert len(first["val"]) == 6 and len(first["train"]) == 24
    assert _ids(first["val"]) == _ids(again["val"])
    assert not set(_ids(first["val"])) & set(_ids(first["train"]))


def test_a_dataset_with_only_train_gets_carved_val_and_test_splits(data_dir):
    splits, _ = load_tfds("tiny_catalog/trainonly", data_dir=data_dir, val_fraction=0.2, test_fraction=0.2)
    assert {name: len(split) for name, split in splits.items()} == {"train": 18, "val": 6, "test": 6}
    ids = {name: set(_ids(split)) for name, split in splits.items()}
    assert set.union(*ids.values()) == {f"tiny_catalog/trainonly:train[{i}]" for i in range(TRAIN)}
    assert sum(map(len, ids.values())) == TRAIN  # disjoint
    for name in ("val", "test"):  # stratified: 2 of each class's 10
        labels = [splits[name][i]["label"] for i in range(len(splits[name]))]
        assert np.bincount(labels, minlength=3).tolist() == [2, 2, 2]
    # a dataset with its own test split keeps it, and the carved val is as before
    kept, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, test_fraction=0.2, seed=3)
    before, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=3)
    assert _ids(kept["test"])[0] == "tiny_catalog/rgb:test[0]" and len(kept["test"]) == TEST
    assert _ids(kept["val"]) == _ids(before["val"])
    with pytest.raises(DataError, match="val_fraction \\+ test_fraction must be below 1"):
        load_tfds("tiny_catalog/trainonly", data_dir=data_dir, val_fraction=0.5, test_fraction=0.5)


def test_no_val_when_fraction_is_zero(data_dir):
    splits, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.0)
    assert set(splits) == {"train", "test"} and len(splits["train"]) == TRAIN


def test_explicit_split_restricts_train(data_dir):
    splits, _ = load_tfds("tfds:tiny_catalog/rgb:train[:50%]", data_dir=data_dir, val_fraction=0.2)
    assert len(splits["train"]) + len(splits["val"]) == TRAIN // 2
    assert splits["val"][0]["id"].startswith("tiny_catalog/rgb:train[:50%][")
    with pytest.raises(DataError, match=r"tfds:tiny_catalog/rgb: split 'nope' is not usable.*train, test"):
        load_tfds("tiny_catalog/rgb:nope", data_dir=data_dir)


def test_a_held_out_split_trained_on_is_not_also_val_or_test(data_dir):
    """tfds:X:train+validation trained on the validation split that then selected the checkpoint,
    and tfds:X:test trained and tested on the same data; such splits are carved from the training
    data instead, as where the dataset has none."""
    splits, _ = load_tfds("tiny_catalog/gray:train+validation", data_dir=data_dir, val_fraction=0.2)
    assert len(splits["train"]) + len(splits["val"]) == TRAIN + VALIDATION
    assert splits["val"][0]["id"].startswith("tiny_catalog/gray:train+validation[")
    assert splits["test"][0]["id"].startswith("tiny_catalog/gray:test[")
    splits, _ = load_tfds("tiny_catalog/rgb:train+test", data_dir=data_dir, val_fraction=0.2)
    assert set(splits) == {"train", "val"} and len(splits["train"]) + len(splits["val"]) == TRAIN + TEST
    # TFDS's "all" is every split together: it left validation and test to select and test on
    splits, _ = load_tfds("tiny_catalog/gray:all", data_dir=data_dir, val_fraction=0.2, test_fraction=0.1)
    assert set(splits) == {"train", "val", "test"}
    assert sum(len(split) for split in splits.values()) == TRAIN + VALIDATION + TEST
    assert all(split[0]["id"].startswith("tiny_catalog/gray:all[") for split in splits.values())


def test_validation_split_is_val_and_grayscale_keeps_a_channel_axis(data_dir):
    splits, _ = load_tfds("tiny_catalog/gray", data_dir=data_dir)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (TRAIN, VALIDATION, TEST)
    expected = _expected_by_marker("gray", "validation", VALIDATION)
    for i in range(VALIDATION):
        example = splits["val"][i]
        assert example["image"].shape == (16, 16, 1)
        image, label = expected.pop(int(example["image"][0, 0, 0]))
        np.testing.assert_array_equal(example["image"], image)
        assert example["label"] == label
        assert example["id"] == f"tiny_catalog/gray:validation[{i}]"


def test_tensor_feature_with_most_bands_is_the_image(data_dir):
    splits, class_names = load_tfds("tiny_catalog/bands", data_dir=data_dir)
    example = splits["test"][0]
    assert example["image"].dtype == np.float32 and example["image"].shape == (4, 4, 5)
    assert class_names == tuple(CLASSES)
    value = example["image"][0, 0, 0]
    assert value == np.float32(value) and (value - 0.5) % 1 == 0  # i + 0.5, stored and read exactly
    assert example["label"] == int(value - 0.5) % 3


def test_rank_two_tensor_gets_a_channel_axis_and_keeps_its_dtype(data_dir):
    splits, _ = load_tfds("tiny_catalog/plane", data_dir=data_dir)
    example = splits["test"][0]
    assert example["image"].dtype == np.uint16 and example["image"].shape == (6, 6, 1)
    i = int(example["image"][0, 0, 0]) - 1000
    assert 0 <= i < TEST and np.all(example["image"] == 1000 + i) and example["label"] == i % 3


def test_split_survives_pickling_for_worker_processes(data_dir):
    splits, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.2, seed=3)
    copy = pickle.loads(pickle.dumps(splits["val"]))
    assert copy._source is None  # reopened in the receiving process, not shipped
    assert len(copy) == len(splits["val"])
    for i in (0, len(copy) - 1):
        assert copy[i]["id"] == splits["val"][i]["id"]
        np.testing.assert_array_equal(copy[i]["image"], splits["val"][i]["image"])


def test_unknown_dataset_and_config(tmp_path):
    with pytest.raises(DataError, match=r"^tfds:no_such_dataset_xyz: no such dataset in the TFDS catalog"):
        load_tfds("no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"^tfds:eurosat/nope: no config 'nope'; choose one of: rgb, all$"):
        load_tfds("eurosat/nope", data_dir=str(tmp_path))


def test_not_prepared_says_how_to_prepare(tmp_path, caplog):
    with pytest.raises(DataError) as caught, caplog.at_level(logging.WARNING):
        load_tfds("eurosat/rgb", data_dir=str(tmp_path))
    assert caplog.records == []  # tfds's warning of a missing dataset_info.json said it first
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"tfds:eurosat/rgb: not prepared in {tmp_path}")
    assert f"tfds build eurosat/rgb --data_dir {tmp_path} --file_format array_record" in message
    assert "manual" not in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or written


def test_manual_download_dataset_names_the_manual_dir(tmp_path):
    with pytest.raises(DataError) as caught:
        load_tfds("resisc45", data_dir=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message and "needs a manual download" in message
    assert str(tmp_path / "downloads" / "manual") in message and "tfds build resisc45" in message


def test_tfrecord_preparation_is_refused_with_the_fix(tmp_path):
    _prepare(tmp_path, "rgb")
    variant = tmp_path / "tiny_catalog" / "rgb" / "1.0.0"
    info = json.loads((variant / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"  # what a default (TensorFlow) preparation writes
    (variant / "dataset_info.json").write_text(json.dumps(info))
    for path in variant.glob("*.array_record-*"):
        path.rename(path.with_name(path.name.replace(".array_record-", ".tfrecord-")))
    with pytest.raises(DataError) as caught:
        load_tfds("tiny_catalog/rgb", data_dir=str(tmp_path))
    message = str(caught.value)
    assert message.startswith(
        f"tfds:tiny_catalog/rgb: prepared in {variant} as tfrecord, which has no random"
    )
    assert f"tfds build tiny_catalog/rgb --data_dir {tmp_path} --file_format array_record" in message


def test_corrupt_record_is_a_bad_image(data_dir):
    splits, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.0)

    class Corrupt:
        def __len__(self):
            return TRAIN

        def __getitem__(self, index):
            raise OSError("cannot identify image file\n<_io.BytesIO object>")

    splits["train"]._source = Corrupt()
    with pytest.raises(
        BadImageError, match=r"^tiny_catalog/rgb:train\[2\]: OSError: cannot identify"
    ) as caught:
        splits["train"][2]
    assert "\n" not in str(caught.value)


def test_unlabelled_record_is_a_bad_image(data_dir):
    splits, _ = load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=0.0)
    good = splits["train"][0]
    splits["train"]._source = [{"image": good["image"], "land": -1}] * TRAIN
    with pytest.raises(
        BadImageError, match=r"^tiny_catalog/rgb:train\[4\]: label -1 out of range for 3 classes$"
    ):
        splits["train"][4]


def test_bad_val_fraction(data_dir):
    with pytest.raises(DataError, match="val_fraction"):
        load_tfds("tiny_catalog/rgb", data_dir=data_dir, val_fraction=1.0)
