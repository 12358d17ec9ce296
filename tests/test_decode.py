"""read_image on every supported kind of file, with fixtures written here: exact values, layouts, failures."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from vision_ft.data import decode
from vision_ft.data.decode import IMAGE_SUFFIXES, check_channels, image_kind, read_image
from vision_ft.data.errors import BadImageError, DataError

RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_image(image: np.ndarray, shape: tuple[int, ...], dtype=np.float32) -> None:
    assert image.dtype == dtype
    assert image.shape == shape
    assert np.isfinite(image).all()


# --- Pillow formats -------------------------------------------------------------------------------


def test_rgb_png_is_exact(tmp_path: Path) -> None:
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    _assert_image(image, (12, 10, 3), np.uint8)  # 8 bits, as timm reads them
    np.testing.assert_array_equal(image, pixels)


def test_rgb_jpeg_close_to_source(tmp_path: Path) -> None:
    # a smooth gradient survives JPEG nearly unchanged, random noise would not
    y, x = np.mgrid[0:32, 0:24]
    pixels = np.stack([y * 7, x * 9, (x + y) * 4], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.JPG", quality=95)
    image = read_image(str(tmp_path / "a.JPG"))
    _assert_image(image, (32, 24, 3), np.uint8)
    assert np.abs(image / 255 - pixels / 255).mean() < 0.02


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").shape == (16, 8, 3)


def test_grayscale_png_has_one_channel(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    _assert_image(image, (6, 7, 1), np.uint8)
    np.testing.assert_array_equal(image[..., 0], pixels)


def test_16bit_png_scaled_by_65535(tmp_path: Path) -> None:
    pixels = np.full((5, 4), 1000, np.uint16)
    pixels[0, 0], pixels[1, 1] = 65535, 0
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    _assert_image(image, (5, 4, 1))
    assert image[2, 2, 0] == np.float32(1000 / 65535)
    assert image[0, 0, 0] == 1.0 and image[1, 1, 0] == 0.0


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([_rgb(), np.zeros((12, 10, 1), np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    _assert_image(image, (12, 10, 3), np.uint8)
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.save(tmp_path / "p.png")
    image = read_image(tmp_path / "p.png")
    _assert_image(image, (2, 2, 3), np.uint8)
    np.testing.assert_array_equal(image[0, 1], [200, 100, 50])
    np.testing.assert_array_equal(image[1, 1], [10, 20, 30])


def test_bilevel_png_is_black_and_white(tmp_path: Path) -> None:
    bits = np.array([[True, False, True], [False, False, True]])
    Image.fromarray(bits).save(tmp_path / "b.png")
    image = read_image(tmp_path / "b.png")
    _assert_image(image, (2, 3, 1), np.uint8)
    np.testing.assert_array_equal(image[..., 0], bits.astype(np.uint8) * 255)


@pytest.mark.parametrize("suffix", [".bmp", ".gif", ".webp"])
def test_other_pillow_formats(tmp_path: Path, suffix: str) -> None:
    pixels = _rgb(6, 7)  # 42 colours: fits a GIF palette, so every format here is lossless
    Image.fromarray(pixels).save(tmp_path / f"a{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_array_equal(read_image(tmp_path / f"a{suffix}"), pixels)


def test_mislabelled_png_still_reads(tmp_path: Path) -> None:
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "really_png.jpg", format="PNG")
    np.testing.assert_array_equal(read_image(tmp_path / "really_png.jpg"), pixels)


# --- TIFF -----------------------------------------------------------------------------------------


def _bands13() -> np.ndarray:
    return RNG.integers(0, 65536, (13, 6, 5), dtype=np.uint16)  # (C, H, W)


@pytest.mark.parametrize("layout", ["separate", "contig"])
def test_13_band_geotiff_layouts(tmp_path: Path, layout: str) -> None:
    bands = _bands13()
    data = bands if layout == "separate" else bands.transpose(1, 2, 0)
    tifffile.imwrite(tmp_path / "s2.tif", data, planarconfig=layout, photometric="minisblack")
    image = read_image(tmp_path / "s2.tif")
    _assert_image(image, (6, 5, 13))
    np.testing.assert_array_equal(image, bands.transpose(1, 2, 0).astype(np.float32) / 65535)


def test_one_band_per_page_tiff(tmp_path: Path) -> None:
    bands = _bands13()[:4]
    tifffile.imwrite(tmp_path / "pages.tiff", bands, photometric="minisblack", metadata=None)
    assert len(tifffile.TiffFile(tmp_path / "pages.tiff").pages) == 4  # the fixture really is 4 pages
    image = read_image(tmp_path / "pages.tiff")
    np.testing.assert_array_equal(image, bands.transpose(1, 2, 0).astype(np.float32) / 65535)


def test_12bit_tiff_scaled_by_4095(tmp_path: Path) -> None:
    pytest.importorskip("imagecodecs")  # tifffile packs/unpacks 12-bit samples with imagecodecs
    pixels = np.array([[0, 1000, 4095], [2048, 7, 4094]], np.uint16)
    tifffile.imwrite(tmp_path / "b12.tif", pixels, bitspersample=12, photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "b12.tif") as tif:
        assert tif.pages[0].bitspersample == 12
    image = read_image(tmp_path / "b12.tif")
    _assert_image(image, (2, 3, 1))
    np.testing.assert_allclose(image[..., 0], pixels / 4095, rtol=1e-6)
    assert image.max() == 1.0


def test_float_tiff_returned_unchanged(tmp_path: Path) -> None:
    data = np.array([[[-0.5, 2.0], [0.25, 1e4]], [[0.0, 0.1], [3.5, -7.0]]], np.float32)  # (H, W, 2)
    tifffile.imwrite(tmp_path / "f.tif", data, planarconfig="contig", photometric="minisblack")
    image = read_image(tmp_path / "f.tif")
    _assert_image(image, (2, 2, 2))
    np.testing.assert_array_equal(image, data)


def test_float_tiff_gaps_take_the_band_mean(tmp_path: Path) -> None:
    data = np.array([[[1.0, np.nan], [np.nan, np.nan]], [[3.0, np.inf], [5.0, np.nan]]], np.float32)
    tifffile.imwrite(tmp_path / "gaps.tif", data, planarconfig="contig", photometric="minisblack")
    image = read_image(tmp_path / "gaps.tif")
    # band 0: valid 1, 3, 5 -> mean 3; band 1: no valid pixel -> 0
    np.testing.assert_array_equal(image[..., 0], [[1.0, 3.0], [3.0, 5.0]])
    np.testing.assert_array_equal(image[..., 1], np.zeros((2, 2)))


def test_geotiff_nodata_value_takes_the_band_mean(tmp_path: Path) -> None:
    data = np.array([[[0, 100], [200, 0]], [[0, 0], [1000, 3000]]], np.uint16)  # (H, W, 2); 0 = no data
    nodata = [(42113, "s", 0, "0", True)]  # GDAL_NODATA, as GDAL writes it
    tifffile.imwrite(
        tmp_path / "nd.tif", data, planarconfig="contig", photometric="minisblack", extratags=nodata
    )
    image = read_image(tmp_path / "nd.tif")
    # band 0: 200 and 1000 are valid -> 600; band 1: 100 and 3000 -> 1550
    want = np.array([[[600, 100], [200, 1550]], [[600, 1550], [1000, 3000]]]) / 65535
    np.testing.assert_allclose(image, want, rtol=1e-6)


@pytest.mark.parametrize("written", ["-3.40282346639e+038", "-3.4028235e+38", "0.1"])
def test_float_geotiff_nodata_matches_as_the_band_stores_it(tmp_path: Path, written: str) -> None:
    """ArcGIS writes float32's lowest value as -3.40282346639e+038, and 0.1 has no float32 of its own:
    the tag's text, read as a double, matched no pixel, so ~-3.4e38 reached the model."""
    value = np.float32(float(written))
    data = np.array([[[value], [0.5]], [[0.25], [0.75]]], np.float32)
    nodata = [(42113, "s", 0, written, True)]
    tifffile.imwrite(tmp_path / "f.tif", data, photometric="minisblack", extratags=nodata)
    image = read_image(tmp_path / "f.tif")
    np.testing.assert_allclose(image[..., 0], [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


@pytest.mark.parametrize("extrasamples", [1, 2])  # associated and unassociated alpha
def test_grey_tiff_with_alpha_drops_it_as_png_does(tmp_path: Path, extrasamples: int) -> None:
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    pixels = np.stack([grey, np.full_like(grey, 255)], axis=-1)
    tifffile.imwrite(tmp_path / "la.tif", pixels, photometric="minisblack", extrasamples=[extrasamples])
    image = read_image(tmp_path / "la.tif")
    assert image.shape == (4, 4, 1)
    np.testing.assert_array_equal(image[..., 0], grey / np.float32(255))
    rgba = np.concatenate([_rgb()[:4, :4], pixels[..., 1:]], axis=-1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=[extrasamples])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), rgba[..., :3] / np.float32(255))


@pytest.mark.parametrize(("bands", "kept"), [(3, 3), (4, 3), (2, 1)], ids=["rgb16", "rgba16", "grey_alpha16"])
def test_16bit_colour_png_keeps_its_16_bits(tmp_path: Path, bands: int, kept: int) -> None:
    """Pillow opens 16-bit RGB(A) and grey+alpha PNGs as 8-bit RGB(A): the low byte was lost (1000
    read back as 3/255) and grey+alpha came out as 3 bands."""
    import imagecodecs

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (5, 7, bands), dtype=np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(imagecodecs.png_encode(pixels))
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (5, 7, kept)
    np.testing.assert_allclose(image, pixels[..., :kept] / 65535.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_colour_png_is_turned_upright_as_pillow_turns_8bit_ones(
    tmp_path: Path, orientation: int
) -> None:
    import struct
    import zlib

    import imagecodecs
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF)
    pixels = (np.arange(5 * 7 * 3).reshape(5, 7, 3) * 250).astype(np.uint16)
    encoded = imagecodecs.png_encode(pixels)
    path = tmp_path / "deep.png"
    path.write_bytes(encoded[:33] + chunk + encoded[33:])  # after IHDR, as cameras and editors write it
    with Image.open(path) as img:
        expected_shape = np.asarray(ImageOps.exif_transpose(img)).shape
    reference = Image.fromarray((pixels >> 8).astype(np.uint8))
    reference.info["exif"] = exif.tobytes()
    reference_exif = reference.getexif()
    reference_exif[0x0112] = orientation
    upright = np.asarray(ImageOps.exif_transpose(reference))
    image = read_image(path)
    assert image.shape == expected_shape == upright.shape
    np.testing.assert_array_equal(np.floor(image * 65535 / 256 + 1e-6).astype(np.uint8), upright)


def test_int16_tiff_keeps_sign(tmp_path: Path) -> None:
    data = np.array([[-32767, -100], [0, 32767]], np.int16)
    tifffile.imwrite(tmp_path / "dem.tif", data)
    image = read_image(tmp_path / "dem.tif")
    np.testing.assert_allclose(image[..., 0], data / 32767, rtol=1e-6)


def test_uint8_rgb_tiff(tmp_path: Path) -> None:
    pixels = _rgb()
    tifffile.imwrite(tmp_path / "rgb.tif", pixels, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), pixels / np.float32(255))


# --- DICOM ----------------------------------------------------------------------------------------


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    bits_stored: int = 12,
    with_pixels: bool = True,
    frames: int | None = None,
    preamble: bool = True,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = (
        pixels.shape[-3:-1] if pixels.ndim == 3 and photometric == "RGB" else pixels.shape[-2:]
    )
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:  # files saved without the 128-byte preamble + 'DICM' (older exports) must still load
        raw = path.read_bytes()
        path.write_bytes(raw[132:])
    return path


def _linear_voi(x: float, center: float, width: float) -> float:
    """DICOM PS3.3 C.11.2.1.2.1, written out independently of the module under test."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0.0
    if x > center - 0.5 + (width - 1) / 2:
        return 1.0
    return (x - (center - 0.5)) / (width - 1) + 0.5


STORED = np.array([[0, 100, 150], [200, 250, 4095]], np.uint16)


def test_dicom_rescale_then_file_window(tmp_path: Path) -> None:
    # slope 2, intercept -100: stored 150 -> 200, 200 -> 300, 250 -> 400; window 300 / 401 spans 100..500
    path = _write_dicom(tmp_path / "ct.dcm", STORED, rescale=(2, -100), window=(300, 401))
    image = read_image(path)
    _assert_image(image, (2, 3, 1))
    assert image[0, 0, 0] == 0.0  # -100, below the window
    assert image[0, 1, 0] == pytest.approx(_linear_voi(100, 300, 401)) == pytest.approx(0.00125)
    assert image[0, 2, 0] == pytest.approx((200 - 299.5) / 400 + 0.5)
    assert image[1, 0, 0] == pytest.approx((300 - 299.5) / 400 + 0.5)
    assert image[1, 1, 0] == pytest.approx((400 - 299.5) / 400 + 0.5)
    assert image[1, 2, 0] == 1.0  # 8090, above the window


def test_dicom_explicit_window_overrides_file(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "ct.dcm", STORED, rescale=(2, -100), window=(300, 401))
    image = read_image(path, window=(0, 201))  # -100..100 in modality units
    assert image[0, 0, 0] == pytest.approx(_linear_voi(-100, 0, 201)) == pytest.approx(0.0025)
    assert image[0, 1, 0] == 1.0  # 100 > 99.5
    assert (image[1] == 1.0).all()


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    normal = read_image(_write_dicom(tmp_path / "m2.dcm", STORED, window=(150, 101)))
    inverted = read_image(
        _write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1", window=(150, 101))
    )
    np.testing.assert_allclose(inverted, 1.0 - normal)
    assert inverted[0, 0, 0] == 1.0


def test_dicom_without_window_uses_min_max(tmp_path: Path) -> None:
    image = read_image(_write_dicom(tmp_path / "plain.dcm", STORED, rescale=(1, 1000)))
    np.testing.assert_allclose(image[..., 0], STORED / 4095, rtol=1e-6)


def test_dicom_constant_image_is_finite(tmp_path: Path) -> None:
    image = read_image(_write_dicom(tmp_path / "flat.dcm", np.full((3, 3), 77, np.uint16)))
    _assert_image(image, (3, 3, 1))
    assert (image == 0).all()


def test_dicom_rgb_scaled_by_bits_stored(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 1024, (4, 5, 3), dtype=np.uint16)
    image = read_image(_write_dicom(tmp_path / "rgb.dcm", pixels, photometric="RGB", bits_stored=10))
    _assert_image(image, (4, 5, 3))
    np.testing.assert_allclose(image, pixels / 1023, rtol=1e-6)


def test_dicom_found_by_marker_without_suffix(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "1.2.840.10008.99", STORED)
    assert image_kind(path) == "dicom"
    assert read_image(path).shape == (2, 3, 1)


def test_dicom_without_preamble_reads(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "old.dcm", STORED, preamble=False)
    assert pydicom.misc.is_dicom(path) is False  # the fixture really lacks the marker
    assert read_image(path).shape == (2, 3, 1)


def test_invalid_window_is_a_config_error(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "ct.dcm", STORED)
    with pytest.raises(ValueError, match="width > 0"):
        read_image(path, window=(40, 0))


# --- failures -------------------------------------------------------------------------------------


def _truncated(tmp_path: Path, name: str) -> Path:
    full = tmp_path / f"full_{name}"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return tmp_path / name


def _zero_byte(tmp_path: Path) -> Path:
    (tmp_path / "empty.png").write_bytes(b"")
    return tmp_path / "empty.png"


def _random_bytes(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).write_bytes(RNG.bytes(300))
    return tmp_path / name


def _truncated_tiff(tmp_path: Path) -> Path:
    tifffile.imwrite(tmp_path / "full.tif", _bands13(), planarconfig="separate", photometric="minisblack")
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.tif"


def _unsupported(tmp_path: Path) -> Path:
    (tmp_path / "notes.xyz").write_bytes(b"hello")
    return tmp_path / "notes.xyz"


BAD_FILES = {
    "zero-byte": (_zero_byte, "empty"),
    "truncated png": (lambda p: _truncated(p, "cut.png"), "truncated"),
    "truncated jpeg": (lambda p: _truncated(p, "cut.jpg"), "truncated"),
    "random png": (lambda p: _random_bytes(p, "noise.png"), "cannot decode image"),
    "random tif": (lambda p: _random_bytes(p, "noise.tif"), "cannot decode TIFF"),
    "truncated tif": (_truncated_tiff, "cannot decode TIFF"),
    "missing": (lambda p: p / "nowhere.png", "not found"),
    "missing no suffix": (lambda p: p / "nowhere", "not found"),
    "directory": (lambda p: (p / "dir.png").mkdir() or p / "dir.png", "not a regular file"),
    "unsupported suffix": (_unsupported, "unsupported file type"),
    "dicom without pixels": (
        lambda p: _write_dicom(p / "nopix.dcm", STORED, with_pixels=False),
        "no pixel data",
    ),
    "multi-frame dicom": (
        lambda p: _write_dicom(p / "cine.dcm", np.zeros((2, 3, 3), np.uint16), frames=2),
        "multi-frame DICOM is not supported",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_bad_image_error_naming_it(tmp_path: Path, case: str) -> None:
    make, reason = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(BadImageError, match=reason) as info:
        read_image(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    assert info.value.path == str(path)


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "big.png")
    tifffile.imwrite(tmp_path / "big.tif", _bands13())
    _write_dicom(tmp_path / "big.dcm", np.zeros((8, 8), np.uint16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels > 2 * 10
    for name in ("big.png", "big.tif", "big.dcm"):
        with pytest.raises(BadImageError, match="(?i)limit"):
            read_image(tmp_path / name)


def test_missing_dicom_codec_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a codec that is not installed is the environment's fault: DataError, not a skippable BadImageError
    path = _write_dicom(tmp_path / "ct.dcm", STORED)
    unavailable = SimpleNamespace(is_available=False, missing_dependencies=["pylibjpeg - requires pylibjpeg"])
    monkeypatch.setattr(decode, "get_decoder", lambda syntax: unavailable)
    with pytest.raises(DataError, match="ct.dcm.*pylibjpeg") as info:
        read_image(path)
    assert not isinstance(info.value, BadImageError)


def test_missing_tiff_codec_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tifffile.imwrite(tmp_path / "lzw.tif", _bands13())

    def needs_imagecodecs(*args: object, **kwargs: object) -> None:
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(decode.tifffile, "TiffFile", needs_imagecodecs)
    with pytest.raises(DataError, match="lzw.tif.*imagecodecs") as info:
        read_image(tmp_path / "lzw.tif")
    assert not isinstance(info.value, BadImageError)


def test_bad_image_error_is_a_data_error() -> None:
    assert issubclass(BadImageError, DataError)


# --- kinds and band counts ------------------------------------------------------------------------


def test_image_kind_and_suffixes(tmp_path: Path) -> None:
    assert image_kind("a/b.PNG") == "raster" and image_kind("x.jpeg") == "raster"
    assert image_kind("s2.TIF") == "tiff" and image_kind("s2.tiff") == "tiff"
    assert image_kind("scan.dcm") == "dicom" and image_kind("scan.dicom") == "dicom"
    assert {
        ".png",
        ".jpg",
        ".jpeg",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".dcm",
        ".dicom",
    } == IMAGE_SUFFIXES
    (tmp_path / "README").write_bytes(b"not dicom" * 30)
    with pytest.raises(BadImageError, match="README.*no suffix"):
        image_kind(tmp_path / "README")


def test_check_channels() -> None:
    image = np.zeros((2, 2, 4), np.float32)
    assert check_channels(image, 4, "tile.tif") is image
    with pytest.raises(BadImageError, match=r"^tile\.tif: has 4 bands, expected 13$"):
        check_channels(image, 13, "tile.tif")
