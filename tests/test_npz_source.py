"""Malformed MedMNIST-layout ``.npz`` files: a DataError naming the file and the member, never a traceback."""

import struct
import zipfile

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from vision_ft.cli import main
from vision_ft.data.errors import DataError
from vision_ft.data.npz import load_npz
from vision_ft.data.pipeline import Geometry
from vision_ft.data.sources import DataOptions, load_dataset
from vision_ft.data.stats import band_statistics


def _valid_arrays(n_train: int = 6, n_val: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (n_train, 8, 8), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 2).reshape(-1, 1),
        "val_images": rng.integers(0, 256, (n_val, 8, 8), dtype=np.uint8),
        "val_labels": (np.arange(n_val) % 2).reshape(-1, 1),
    }


def _corrupt_deflate_stream(path, member: str) -> None:
    """Make ``member``'s compressed data start with deflate's reserved block type: zlib.error on read."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(member).header_offset
    # the local header's name and extra-field lengths can differ from the central directory's
    name_length, extra_length = struct.unpack_from("<HH", data, offset + 26)
    data[offset + 30 + name_length + extra_length] = 0xFF
    path.write_bytes(bytes(data))


def _write_case(path, case: str) -> None:
    arrays = _valid_arrays()
    if case == "corrupt_deflate":
        np.savez_compressed(path, **arrays)
        _corrupt_deflate_stream(path, "train_labels.npy")
        return
    if case == "not_npy_member":
        with zipfile.ZipFile(path, "w") as archive:
            for key in arrays:
                archive.writestr(f"{key}.npy", b"not an array" if key == "train_images" else b"")
        return
    replacements = {
        "zero_d_labels": {"train_labels": np.array(3)},
        "three_d_labels": {"train_labels": np.zeros((6, 1, 1), np.int64)},
        "empty_train": {"train_images": np.zeros((0, 8, 8), np.uint8), "train_labels": np.zeros((0, 1))},
        "string_labels": {"train_labels": np.array(["a", "b"] * 3)},
        "complex_labels": {"train_labels": (np.arange(6) % 2).astype(complex)},
        "object_labels": {"train_labels": np.array([0, 1, None, 1, 0, 1], dtype=object)},
        "fractional_labels": {"train_labels": np.array([0.5, 1, 0, 1, 0, 1])},
        "nan_labels": {"train_labels": np.array([np.nan, 1, 0, 1, 0, 1])},
        "negative_labels": {"val_labels": np.array([-1, 1, 0, 1])},
        "flat_images": {"train_images": np.zeros((6, 64), np.uint8)},
        "five_d_images": {"train_images": np.zeros((6, 2, 8, 8, 1), np.uint8)},
        # MedMNIST 3D: (N, 28, 28, 28) volumes were read as 28x28 images of 28 bands
        "volumes": {"train_images": np.zeros((6, 8, 8, 8), np.uint8)},
        "bandless_images": {"train_images": np.zeros((6, 8, 8, 0), np.uint8)},
        "count_mismatch": {"train_labels": np.zeros((5, 1), np.int64)},
        "float_images": {"train_images": np.zeros((6, 8, 8), np.float32)},
        "multi_label_not_binary": {"train_labels": np.array([[0, 2]] * 6)},
    }
    np.savez(path, **{**arrays, **replacements[case]})


# case -> the member the message must name, and what it must say is wrong
BAD_FILES = {
    "zero_d_labels": ("train_labels", "shape ()"),
    "three_d_labels": ("train_labels", "shape (6, 1, 1)"),
    "empty_train": ("train_images", "no images"),
    "string_labels": ("train_labels", "dtype <U1"),
    "complex_labels": ("train_labels", "dtype complex128"),
    "object_labels": ("train_labels", "allow_pickle=False"),
    "fractional_labels": ("train_labels", "holds 0.5"),
    "nan_labels": ("train_labels", "holds nan"),
    "negative_labels": ("val_labels", "holds -1"),
    "flat_images": ("train_images", "shape (6, 64)"),
    "five_d_images": ("train_images", "shape (6, 2, 8, 8, 1)"),
    "volumes": ("train_images", "shape (6, 8, 8, 8), which looks like 3-D volumes"),
    "bandless_images": ("train_images", "no pixels or no bands"),
    "count_mismatch": ("train_labels", "6 images but train_labels 5 labels"),
    "float_images": ("train_images", "must be uint8"),
    "multi_label_not_binary": ("train_labels", "values other than 0 and 1"),
    "corrupt_deflate": ("train_labels", "invalid block type"),
    "not_npy_member": ("train_images", "not a NumPy array"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_npz_is_a_data_error_naming_file_and_member(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    _write_case(path, case)
    member, problem = BAD_FILES[case]
    with pytest.raises(DataError) as error:
        load_dataset(f"npz:{path}")
    message = str(error.value)
    assert str(path) in message and member in message and problem in message, message
    assert "\n" not in message


def test_unreadable_or_incomplete_archives_are_data_errors(tmp_path):
    not_a_zip = tmp_path / "plain.npz"
    not_a_zip.write_bytes(b"just text")
    no_train = tmp_path / "no_train.npz"
    np.savez(no_train, **{k: v for k, v in _valid_arrays().items() if not k.startswith("train")})
    half_a_split = tmp_path / "half.npz"
    np.savez(half_a_split, **{k: v for k, v in _valid_arrays().items() if k != "val_labels"})
    for path, problem in [
        (not_a_zip, "not an .npz archive"),
        (no_train, "has no train_images/train_labels"),
        (half_a_split, "val_images and val_labels must come together"),
        (tmp_path / "absent.npz", "does not exist"),
        (tmp_path, "is a directory, not a file"),  # said "does not exist"
    ]:
        with pytest.raises(DataError) as error:
            load_npz(path)
        assert str(path) in str(error.value) and problem in str(error.value)


def test_valid_files_load_as_before_and_unrelated_members_are_not_read(tmp_path):
    path = tmp_path / "ok.npz"
    arrays = _valid_arrays()
    # whole-number floats and flat label vectors are accepted class indices
    arrays["val_labels"] = np.array([0.0, 1.0, 0.0, 1.0])
    np.savez(path, **arrays, notes=np.array(["an unrelated member"]))
    splits = load_npz(path)
    assert set(splits) == {"train", "val"}
    images, labels = splits["train"]
    assert images.shape == (6, 8, 8, 1) and labels.dtype == np.int64 and labels.tolist() == [0, 1] * 3
    assert splits["val"][1].dtype == np.int64 and splits["val"][1].tolist() == [0, 1, 0, 1]

    multi = tmp_path / "multi.npz"
    np.savez(multi, train_images=np.zeros((4, 8, 8, 3), np.uint8), train_labels=np.eye(4, 3, dtype=np.uint8))
    images, labels = load_npz(multi)["train"]
    assert images.shape == (4, 8, 8, 3) and labels.shape == (4, 3) and labels.dtype == np.uint8


@pytest.mark.parametrize("case", ["corrupt_deflate", "zero_d_labels", "string_labels", "empty_train"])
def test_cli_reports_a_bad_npz_in_one_line_with_exit_2(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    _write_case(path, case)
    result = CliRunner().invoke(main, ["stats", "--data", f"npz:{path}"])
    # CliRunner records an uncaught exception here instead of printing its traceback
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert str(path) in lines[0] and BAD_FILES[case][0] in lines[0]
    assert "Traceback" not in result.output


def test_a_label_far_beyond_any_class_count_is_refused_not_expanded(tmp_path):
    path = tmp_path / "stray.npz"
    np.savez(path, **{**_valid_arrays(), "val_labels": np.array([0, 1, 0, 2**40])})
    with pytest.raises(DataError, match=f"label {2**40} is not a class index"):
        load_dataset(f"npz:{path}")  # it built 2**40 class names before


def test_stats_output_makes_its_folder_and_refuses_a_file_on_the_way_first(tmp_path):
    """`stats --output` into a folder not there yet raised FileNotFoundError (a traceback) after the
    whole pass over the split; a file where its folder should be is refused before that pass."""
    path = tmp_path / "data.npz"
    np.savez(path, **_valid_arrays())
    output = tmp_path / "new" / "folder" / "stats.yaml"
    args = ["stats", "--data", f"npz:{path}", "--img-size", "16", "--output", str(output)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert set(yaml.safe_load(output.read_text())) == {"mean", "std"}
    (tmp_path / "a_file").write_text("mine")
    blocked = tmp_path / "a_file" / "stats.yaml"
    result = CliRunner().invoke(main, ["stats", "--data", "npz:/no/such.npz", "--output", str(blocked)])
    assert result.exit_code == 2 and "is a file, not a directory" in result.output, result.output
    assert (tmp_path / "a_file").read_text() == "mine"


def test_splits_whose_images_have_other_band_counts_are_refused_unless_grey_and_rgb(tmp_path):
    """A 4-band validation split beside 1-band training images loaded, and fit then skipped every
    validation image as unusable, one warning each."""
    arrays = _valid_arrays()
    path = tmp_path / "bands.npz"
    np.savez(path, **{**arrays, "val_images": np.zeros((4, 8, 8, 4), np.uint8)})
    with pytest.raises(DataError, match=r"different numbers of bands \(train 1, val 4\)"):
        load_npz(path)
    np.savez(path, **{**arrays, "val_images": np.zeros((4, 8, 8, 3), np.uint8)})  # converted to grey
    assert load_npz(path)["val"][0].shape == (4, 8, 8, 3)


def _small_png_folder(root, per_class):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_stats_names_an_empty_split_in_one_line(tmp_path):
    """Three images a class draw no validation images at 0.1: stats fell through to a ValueError
    (a traceback, exit 1)."""
    root = _small_png_folder(tmp_path / "small", per_class=3)
    result = CliRunner().invoke(main, ["stats", "--data", f"folder:{root}", "--split", "val"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "the val split of folder:" in lines[0] and "is empty" in lines[0]


def test_stats_draws_the_split_fit_draws(tmp_path):
    """stats drew folder splits with seed 0 and fit's default fractions whatever the fit would use, so
    its "train" statistics took in images that fit then validated and tested on."""
    root = _small_png_folder(tmp_path / "folder", per_class=10)
    options = DataOptions(val_fraction=0.2, test_fraction=0.3, seed=3)
    train = load_dataset(f"folder:{root}", options).splits["train"]
    expected, _, _ = band_statistics(train, Geometry(16, "bicubic", 1.0, channels=1))
    args = ["stats", "--data", f"folder:{root}", "--img-size", "16", "--val-fraction", "0.2",
            "--test-fraction", "0.3", "--seed", "3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"# {len(train)} images") and len(train) == 10
    np.testing.assert_allclose(yaml.safe_load(result.output)["mean"], expected, rtol=1e-6)


def test_stats_read_the_crop_that_fit_reads(tmp_path):
    """stats always read the whole image (crop 1.0): with a config's eval_crop_pct, or null for the
    model's own, fit's statistics came from a center crop that stats could not reproduce."""
    root = _small_png_folder(tmp_path / "folder", per_class=10)
    train = load_dataset(f"folder:{root}").splits["train"]
    base = ["stats", "--data", f"folder:{root}", "--img-size", "16"]
    for crop, crop_pct in (("0.5", 0.5), ("model", 0.875)):  # tf_efficientnet_lite0's own crop_pct
        expected, _, _ = band_statistics(train, Geometry(16, "bicubic", crop_pct, channels=1))
        result = CliRunner().invoke(main, [*base, "--eval-crop-pct", crop])
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(yaml.safe_load(result.output)["mean"], expected, rtol=1e-6)
    whole, _, _ = band_statistics(train, Geometry(16, "bicubic", 1.0, channels=1))
    assert not np.allclose(expected, whole)  # the crop matters for these images
    result = CliRunner().invoke(main, [*base, "--eval-crop-pct", "1.5"])
    assert result.exit_code == 2 and "--eval-crop-pct" in result.output, result.output
