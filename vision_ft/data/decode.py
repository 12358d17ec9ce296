"""Read one image file (PNG/JPEG/BMP/GIF/WebP, TIFF/GeoTIFF, DICOM) into an ``(H, W, C)`` array.

Every file-backed dataset goes through :func:`read_image`, so the rest of the pipeline sees one layout and
one value convention whatever the source format, and every way a file can be unusable surfaces as a
:class:`BadImageError` naming it (the run then skips or stops, per ``--on-bad-image``).

Value conventions, chosen so that nothing is lost before per-band normalization:

* 8-bit PNG/JPEG/BMP/GIF/WebP images stay uint8, as timm reads them: resized on 8 bits, they round and
  clip as timm's transforms do (the pipeline scales them to ``[0, 1]`` after resizing);
* unsigned integers are divided by the largest value their *true* bit depth can hold (a 12-bit TIFF by 4095,
  a 16-bit PNG by 65535), giving ``[0, 1]``;
* signed integers (e.g. int16 elevation or SAR bands) are divided by their positive maximum and keep their
  sign, giving ``[-1, 1]``: clipping at 0 would silently erase below-zero measurements;
* float TIFFs are returned as stored (reflectances, temperatures are already meaningful);
* GeoTIFF no-data pixels (the GDAL_NODATA value, and NaN or infinite floats) take their band's mean
  over the image's valid pixels, 0 for a band with none: a model cannot take NaN, and the mean is
  what normalization centres on, so gaps neither poison a batch nor look like a bright or dark feature;
* DICOM grey levels go through the modality LUT (slope/intercept) and a VOI window into ``[0, 1]``.

A codec that is not installed (LZW TIFF without ``imagecodecs``, JPEG-LS DICOM without ``pylibjpeg``) is a
problem of the environment, not of one example, so it raises a plain :class:`DataError` that stops the run
instead of silently skipping every such file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import tifffile
from PIL import Image, ImageOps
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder

from vision_ft.data.errors import BadImageError, DataError

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES: frozenset[str] = RASTER_SUFFIXES | TIFF_SUFFIXES | DICOM_SUFFIXES

# Whatever the suffix says, only these decoders may run: a mislabelled .jpg that is really a PNG still
# loads, but a renamed EPS or PSD never reaches a decoder nobody asked for (EPS would start Ghostscript).
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "GIF", "WEBP")  # JPEG also opens MPO (camera) files

_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128

_TIFF_PALETTE = 3
_TIFF_MINISWHITE = 0
_TIFF_RGB = 2


def image_kind(path: str | Path) -> str:
    """``"raster"``, ``"tiff"`` or ``"dicom"``: which decoder a file needs, from its suffix.

    DICOM exports are often named by UID (``1.2.840.113619.2.5``) or have no suffix at all, so a file whose
    suffix is not an image suffix is still recognised as DICOM by the ``DICM`` marker at byte 128.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if _has_dicom_magic(path):
        return "dicom"
    described = f"suffix {suffix!r}" if suffix else "no suffix"
    expected = ", ".join(sorted(IMAGE_SUFFIXES))
    raise BadImageError(
        str(path), f"unsupported file type ({described}, no DICOM marker); expected {expected}"
    )


def read_image(path: str | Path, *, window: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W, C) array: uint8 for 8-bit images, else float32 scaled by the file's true bit depth (see
    the module docstring).

    ``window=(center, width)`` is the DICOM VOI window in modality units (e.g. Hounsfield units after
    RescaleSlope/Intercept); it overrides the file's own window and is ignored for other formats, so one
    setting can serve a folder that mixes DICOM and PNG files.
    """
    path = Path(path)
    _check_window(window)
    _check_file(path)
    kind = image_kind(path)
    if kind == "raster":
        image = _read_raster(path)
    elif kind == "tiff":
        image = _read_tiff(path)
    else:
        image = _read_dicom(path, window)
    return _finish(image, path)


def check_channels(image: np.ndarray, expected: int, path: str | Path) -> np.ndarray:
    """Return ``image`` unchanged if it has ``expected`` bands; a file with the wrong band count is one bad
    example (e.g. a 4-band tile in a 13-band Sentinel-2 set), not a reason to reshape it silently."""
    bands = image.shape[-1]
    if bands != expected:
        raise BadImageError(str(path), f"has {bands} bands, expected {expected}")
    return image


def _check_window(window: tuple[float, float] | None) -> None:
    # A bad window is a configuration mistake, not bad data: it must stop the run, not skip every image.
    if window is None:
        return
    center, width = window
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError(
            f"DICOM window must be (center, width) with a finite center and width > 0, got {window}"
        )


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except OSError as e:
        raise BadImageError(str(path), f"cannot access file: {e.strerror or e}") from None
    if not path.is_file():
        raise BadImageError(str(path), "is not a regular file")
    if size == 0:
        raise BadImageError(str(path), "file is empty (0 bytes)")


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except OSError as e:
        raise BadImageError(str(path), f"cannot read file: {e.strerror or e}") from None
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


@contextmanager
def _decode_errors(path: Path, what: str) -> Iterator[None]:
    """Turn whatever a decoder raises on a damaged file into one BadImageError naming it.

    Pillow, tifffile and pydicom each raise their own zoo (OSError, ValueError, struct.error, IndexError,
    SyntaxError...) on truncated or corrupted input, so the catch is deliberately wide; our own DataErrors
    pass through untouched, and MemoryError is left alone because it says nothing about the file.
    """
    try:
        yield
    except (DataError, MemoryError):
        raise
    except Exception as e:
        message = _one_line(e)
        if "imagecodecs" in message:
            raise DataError(f"{path}: {what} needs the 'imagecodecs' package to decode: {message}") from e
        raise BadImageError(str(path), f"cannot decode {what}: {message}") from e


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_pixel_count(path: Path, pixels: int) -> None:
    """Apply Pillow's decompression-bomb limit to TIFF and DICOM too, before their decoders allocate."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > 2 * limit:
        raise BadImageError(
            str(path),
            f"image has {pixels} pixels, over the limit of {2 * limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)",
        )


def _finish(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise BadImageError(str(path), f"image has shape {image.shape}; it has no pixels")
    return np.ascontiguousarray(image, dtype=np.uint8 if image.dtype == np.uint8 else np.float32)


# --- PNG, JPEG, BMP, GIF, WebP (Pillow) -----------------------------------------------------------


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GREY_ALPHA, _PNG_RGB, _PNG_RGBA = 4, 2, 6  # IHDR colour types Pillow reads as 8-bit at 16 bits


def _deep_colour_png_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of a 16-bit RGB, RGBA or grey+alpha PNG, else None."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    deep_colour = depth == 16 and colour in (_PNG_GREY_ALPHA, _PNG_RGB, _PNG_RGBA)
    return (height, width) if deep_colour else None


def _read_deep_colour_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    # Pillow would keep only each sample's high byte (and make grey+alpha RGB); libpng through
    # imagecodecs keeps all 16 bits
    import imagecodecs

    _check_pixel_count(path, size[0] * size[1])
    with _decode_errors(path, "PNG"):
        samples = imagecodecs.png_decode(path.read_bytes())
        with Image.open(path, formats=("PNG",)) as img:  # its eXIf chunk, as exif_transpose reads it
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    bands = samples[..., 0] if samples.shape[-1] == 2 else samples[..., :3]  # alpha dropped
    return _upright(bands, orientation).astype(np.float32) / 65535.0


_EXIF_ORIENTATION = 0x0112


def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` turned as ``ImageOps.exif_transpose`` turns a Pillow image of EXIF ``orientation``."""
    turns = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return turns[orientation](image) if orientation in turns else image


def _read_raster(path: Path) -> np.ndarray:
    with _decode_errors(path, "image"):
        deep_colour = _deep_colour_png_size(path)
    if deep_colour is not None:
        return _read_deep_colour_png(path, deep_colour)
    with _decode_errors(path, "image"):
        # Pillow's decompression-bomb check raises inside open(); load() decodes now, so a file cut short
        # raises here (ImageFile.LOAD_TRUNCATED_IMAGES is left at its default, False) instead of
        # returning grey rows. The process-wide flag is not toggled: loaders run in threads.
        with Image.open(path, formats=_PIL_FORMATS) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)  # phone photos are stored sideways with an EXIF tag
            return _pil_to_array(upright)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # Pillow only yields these from 16-bit greyscale PNGs here (older releases as "I")
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode == "F":
        return np.asarray(img, dtype=np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(img.convert("L"))  # bilevel as 0 and 255, as timm's RGB conversion has it
    if mode in ("P", "PA"):
        # via RGBA so that palette transparency does not trigger Pillow's conversion warning; alpha dropped
        return np.asarray(img.convert("RGBA"))[..., :3]
    # RGB, RGBA (alpha dropped, not composited), CMYK JPEGs, YCbCr...
    return np.asarray(img.convert("RGB"))


# --- TIFF / GeoTIFF (tifffile) --------------------------------------------------------------------


def _read_tiff(path: Path) -> np.ndarray:
    with _decode_errors(path, "TIFF"):
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise BadImageError(str(path), "TIFF holds no image")
            # series[0] is the full-resolution image; GeoTIFF overviews and masks are separate levels/series
            series = tif.series[0]
            page = series.keyframe
            _check_pixel_count(path, math.prod(series.shape) // max(1, page.samplesperpixel))
            data = series.asarray()
            axes = series.axes
            bits = int(page.bitspersample)
            photometric = int(page.photometric)
            colormap = page.colormap
            extrasamples = tuple(page.extrasamples)
            nodata = _gdal_nodata(page)
        image = _tiff_to_hwc(data, axes, path)
        if photometric == _TIFF_PALETTE and colormap is not None:
            # TIFF colormaps are 16-bit by definition (TIFF 6.0, ColorMap)
            return np.moveaxis(colormap[:, image[..., 0]], 0, -1).astype(np.float32) / 65535.0
        image = _without_alpha(image, photometric, extrasamples)
        scaled = _scale_tiff_values(image, bits, path)
        if photometric == _TIFF_MINISWHITE and image.dtype.kind in "ub":
            scaled = 1.0 - scaled  # "min is white": 0 is the brightest value
        invalid = ~np.isfinite(scaled)
        if nodata is not None:
            invalid |= _is_nodata(image, nodata)
        return fill_with_band_means(scaled, invalid) if invalid.any() else scaled


_TIFF_ALPHA = (1, 2)  # ExtraSamples: associated, unassociated alpha
_TIFF_COLOUR_BANDS = {_TIFF_MINISWHITE: 1, 1: 1, _TIFF_RGB: 3}  # 1: MinIsBlack


def _without_alpha(image: np.ndarray, photometric: int, extrasamples: tuple[int, ...]) -> np.ndarray:
    """The image without its alpha samples, as PNG is read (grey + alpha included); the extra samples
    follow the colour ones, and those not marked alpha (a multispectral file's bands) are kept."""
    colour = _TIFF_COLOUR_BANDS.get(photometric)
    if colour is None or image.shape[-1] != colour + len(extrasamples):
        return image
    keep = [*range(colour), *(colour + i for i, kind in enumerate(extrasamples) if kind not in _TIFF_ALPHA)]
    return image[..., keep] if len(keep) < image.shape[-1] else image


def _is_nodata(image: np.ndarray, nodata: float) -> np.ndarray:
    """Where the image holds the GDAL no-data value, compared as the band stores it: the tag's decimal
    text (ArcGIS's -3.40282346639e+038 for float32's lowest value, or 0.1) is rarely the stored
    float exactly, and GDAL too compares in the band's type."""
    if image.dtype.kind != "f":
        return image.astype(np.float64) == nodata
    finfo = np.finfo(image.dtype)
    if abs(nodata) > finfo.max and math.isclose(abs(nodata), float(finfo.max), rel_tol=1e-6):
        nodata = math.copysign(float(finfo.max), nodata)  # just past it in decimal, as GDAL allows
    with np.errstate(over="ignore"):
        return image == image.dtype.type(nodata)


_GDAL_NODATA_TAG = 42113


def _gdal_nodata(page: tifffile.TiffPage) -> float | None:
    tag = page.tags.get(_GDAL_NODATA_TAG)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip().strip("\x00"))
    except ValueError:
        return None  # an unparseable tag marks nothing


def fill_with_band_means(image: np.ndarray, invalid: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) with its ``invalid`` pixels set to their band's mean over the valid ones."""
    valid = ~invalid
    counts = valid.sum(axis=(0, 1))
    sums = np.where(valid, image, 0).sum(axis=(0, 1), dtype=np.float64)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    return np.where(invalid, means, image).astype(np.float32)


def _tiff_to_hwc(data: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Put the band axis last, using the axes tifffile read from the file (planar ``SYX``, contiguous
    ``YXS``, or one band per page ``IYX``/``QYX``/``CYX``) rather than guessing from sizes."""
    if "Y" not in axes or "X" not in axes:
        raise BadImageError(str(path), f"TIFF has axes {axes!r}; expected an image with Y and X axes")
    keep = [i for i, axis in enumerate(axes) if axis in "YX" or data.shape[i] > 1]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if len(axes) > 3:
        raise BadImageError(
            str(path),
            f"TIFF has axes {axes!r} with shape {data.shape}; expected one image with at most one band axis",
        )
    order = [axes.index("Y"), axes.index("X")] + [i for i, axis in enumerate(axes) if axis not in "YX"]
    image = np.transpose(data, order)
    return image if image.ndim == 3 else image[..., None]


def _scale_tiff_values(image: np.ndarray, bits: int, path: Path) -> np.ndarray:
    kind, itemsize_bits = image.dtype.kind, image.dtype.itemsize * 8
    if kind in "bf":
        return image.astype(np.float32)
    # BitsPerSample below the container width means e.g. 12-bit samples that tifffile unpacked into uint16
    true_bits = bits if 0 < bits < itemsize_bits else itemsize_bits
    if kind == "u":
        top = float(2**true_bits - 1)
        return np.clip(image.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)
    if kind == "i":
        top = float(2 ** (true_bits - 1) - 1)
        return np.clip(image.astype(np.float64) / top, -1.0, 1.0).astype(np.float32)
    raise BadImageError(str(path), f"unsupported TIFF sample type {image.dtype}")


# --- DICOM (pydicom) ------------------------------------------------------------------------------


def _read_dicom(path: Path, window: tuple[float, float] | None) -> np.ndarray:
    with _decode_errors(path, "DICOM"):
        # force=True: old files without the 128-byte preamble are still valid DICOM
        ds = pydicom.dcmread(path, force=True)
        if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise BadImageError(str(path), "DICOM has no pixel data")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise BadImageError(str(path), f"multi-frame DICOM is not supported ({frames} frames)")
        _check_pixel_count(path, int(ds.Rows) * int(ds.Columns))
        _require_dicom_decoder(ds, path)
        pixels = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        samples = int(ds.get("SamplesPerPixel", 1))
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(pixels, ds)
            return rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)
        if samples == 3:
            # colour is stored, not measured: no modality LUT or window, just the stored bit depth
            return pixels.astype(np.float32) / float(2 ** int(ds.BitsStored) - 1)
        if samples != 1:
            raise BadImageError(str(path), f"DICOM has {samples} samples per pixel; expected 1 or 3")
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        grey = _apply_window(values, window, ds)
        if photometric == "MONOCHROME1":
            grey = 1.0 - grey  # MONOCHROME1 shows low values as white
        return grey.astype(np.float32)


def _require_dicom_decoder(ds: pydicom.Dataset, path: Path) -> None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return  # pydicom assumes Implicit VR Little Endian, which needs no plugin
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise BadImageError(str(path), f"DICOM transfer syntax {syntax.name} cannot be decoded") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise DataError(
            f"{path}: decoding DICOM {syntax.name} needs a package that is not installed ({needs})"
        )


def _apply_window(values: np.ndarray, window: tuple[float, float] | None, ds: pydicom.Dataset) -> np.ndarray:
    """The VOI transform to [0, 1]: the caller's window, else the file's, else the data's own min-max."""
    function = "LINEAR"
    if window is None:
        window = _file_window(ds)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    if window is None:
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros_like(values)
        return (values - low) / (high - low)
    center, width = window
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700.0, 700.0)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    # DICOM PS3.3 C.11.2.1.2.1 "LINEAR"; a width of 1 or less degenerates to a threshold at center - 0.5
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _file_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center, width = _first_value(center), _first_value(width)
    if center is None or width is None or not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return None  # an empty or nonsensical stored window: fall back to min-max rather than reject
    return center, width


def _first_value(value: object) -> float | None:
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        values = [value]
    else:
        values = list(value)
    if not values or values[0] in (None, ""):
        return None
    return float(values[0])
