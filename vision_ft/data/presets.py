"""Augmentation defaults per imaging modality; every explicit setting overrides its preset."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # photographs: scale and framing vary, up is up, colour varies with lighting
    "natural": dict(random_crop=True, hflip=True, vflip=False, rot90=False, translate=0.0, color_jitter=0.2),
    # satellite tiles and histology: no canonical orientation; bands carry physics, so no colour jitter
    "overhead": dict(random_crop=True, hflip=True, vflip=True, rot90=True, translate=0.0, color_jitter=0.0),
    # grayscale scans: anatomy keeps its orientation and scale; small shifts and left-right mirroring
    "medical": dict(random_crop=False, hflip=True, vflip=False, rot90=False, translate=0.1, color_jitter=0.0),
}


def modality_for(requested: str, channels: int) -> str:
    """``auto``: one band is medical, more than three multispectral (overhead), three natural."""
    if requested != "auto":
        return requested
    if channels == 1:
        return "medical"
    return "overhead" if channels > 3 else "natural"


def resolve_augmentation(requested: str, channels: int, **explicit) -> dict:
    """The preset of the modality, with every non-None value of ``explicit`` taking precedence."""
    settings = dict(PRESETS[modality_for(requested, channels)])
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings
