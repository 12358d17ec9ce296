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


def eval_transform(image: Image.Image, cfg: PretrainedCfg) -> np.ndarray:
    """Resize to ``size / crop_pct``, center-crop to the model's input size and normalize:
    returns float32 HWC, the NHWC counterpart of timm's eval transform."""
    channels, height, width = cfg.input_size
    scale_size = math.floor(height / cfg.crop_pct)
    image = image.convert("L" if channels == 1 else "RGB")
    image = center_crop(resize_shorter(image, scale_size, cfg.interpolation), height, width)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return (array - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
