"""Image preprocessing from a model's ``pretrained_cfg``, with timm's eval-transform semantics."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from vision_ft.models.registry import PretrainedCfg

PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resize_shorter(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Scale so the shorter side is ``size``; the longer side is truncated, as torchvision does."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), PIL_INTERPOLATION[interpolation])


def center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    w, h = image.size
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


CROP_MODES = ("center", "squash", "border")


def check_crop_mode(crop_mode: str) -> str:
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, not {crop_mode!r}")
    return crop_mode


def border_fill(mean: tuple[float, ...]) -> tuple[float, ...]:
    """timm's padding colour for ``crop_mode="border"``: the mean as 8-bit pixels, in [0, 1]."""
    return tuple(round(255 * m) / 255 for m in mean)


def border_size(h: int, w: int, scale_size: int) -> tuple[int, int]:
    """(height, width) that fits the longer side into ``scale_size``, as timm's ResizeKeepRatio
    with ``longest=1``."""
    ratio = max(h / scale_size, w / scale_size)
    return round(h / ratio), round(w / ratio)


def crop_or_pad(image: np.ndarray, size: int, fill: tuple[float, ...] | float) -> np.ndarray:
    """Center an HWC float image on a ``size`` x ``size`` canvas of ``fill``: padded (the odd pixel
    after it) where smaller, cropped (offset rounded) where larger, as timm's CenterCropOrPad."""
    h, w, c = image.shape
    canvas = np.empty((max(h, size), max(w, size), c), np.float32)
    canvas[...] = fill
    top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
    canvas[top : top + h, left : left + w] = image
    top, left = int(round((canvas.shape[0] - size) / 2.0)), int(round((canvas.shape[1] - size) / 2.0))
    return canvas[top : top + size, left : left + size]


def eval_transform(image: Image.Image, cfg: PretrainedCfg) -> np.ndarray:
    """timm's eval transform for ``cfg``, in PIL's steps: resize to ``size / crop_pct`` (the shorter
    side for ``crop_mode`` center, both sides for squash, the longer side for border), center-crop
    (or pad, for border) to the model's input size and normalize. Returns float32 HWC."""
    channels, height, width = cfg.input_size
    scale_size = math.floor(height / cfg.crop_pct)
    image = image.convert("L" if channels == 1 else "RGB")
    mode = check_crop_mode(cfg.crop_mode or "center")  # timm reads None as center
    interpolation = PIL_INTERPOLATION[cfg.interpolation]
    if mode == "border":
        new_h, new_w = border_size(image.height, image.width, scale_size)
        resized = to_unit_range(np.asarray(image.resize((new_w, new_h), interpolation)))
        array = crop_or_pad(resized, height, np.asarray(border_fill(cfg.mean), np.float32)[:channels])
    else:
        if mode == "center":
            image = resize_shorter(image, scale_size, cfg.interpolation)
        else:  # squash
            image = image.resize((scale_size, scale_size), interpolation)
        array = to_unit_range(np.asarray(center_crop(image, height, width)))
    return (array - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """float32 HWC: integers scaled by their dtype's maximum, floats kept as they are (already decoded
    files come scaled by their true bit depth; see ``data/decode.py``)."""
    if image.ndim == 2:
        image = image[..., None]
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    return image.astype(np.float32, copy=False)


def resize_box(
    image: np.ndarray,
    height: int,
    width: int,
    interpolation: str,
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resize the ``box`` (left, top, right, bottom; default the whole image) of an HWC array to
    ``height`` x ``width`` with PIL's filter. uint8 with 1 or 3 channels goes through PIL as one
    image and stays uint8; anything else (more bands, other dtypes) is resized band by band in
    float32, integers scaled to [0, 1] first, so that ``to_unit_range`` of the result is on one
    scale whether or not the image needed resizing."""
    h, w, c = image.shape
    if box is None and (h, w) == (height, width):
        return image
    resample = PIL_INTERPOLATION[interpolation]
    if image.dtype == np.uint8 and c in (1, 3):
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        out = np.asarray(pil.resize((width, height), resample, box=box))
        return out[..., None] if out.ndim == 2 else out
    unit = to_unit_range(image)
    bands = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(unit[..., i]), mode="F").resize(
                (width, height), resample, box=box
            )
        )
        for i in range(c)
    ]
    return np.stack(bands, axis=-1)


def center_resize_size(
    h: int, w: int, size: int, crop_pct: float, crop_mode: str = "center"
) -> tuple[int, int]:
    """(height, width) that timm's eval transform resizes to before its center crop of ``size``:
    ``size / crop_pct`` on the shorter side (torchvision truncates the longer), or on both sides
    with crop_mode "squash". Resized and cropped in these two steps, not as one resize of the kept
    box: on 8-bit images the two round differently."""
    scale_size = math.floor(size / crop_pct)
    if crop_mode == "squash":
        return scale_size, scale_size
    if w <= h:
        return int(scale_size * h / w), scale_size
    return scale_size, int(scale_size * w / h)


def random_resized_crop_box(
    rng: np.random.Generator,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling: an area fraction in ``scale`` and a log-uniform
    aspect ratio in ``ratio``, ten tries, then the largest central crop within ``ratio``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return (left, top, left + cw, top + ch)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return (left, top, left + cw, top + ch)
