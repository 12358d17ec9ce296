"""Every registered ``model.tag`` carries timm's pretrained_cfg, not its model's default one."""

import pytest

from vision_ft.models.registry import UnknownModelError, get_model_entry, list_models

timm = pytest.importorskip("timm")

FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "license")


def _as_compared(value):
    return tuple(value) if isinstance(value, list | tuple) else value


def test_every_tag_has_timms_input_normalization_classes_and_license():
    names = list_models(pretrained=True)
    assert len(names) > 100
    wrong = []
    for name in names:
        cfg, ref = get_model_entry(name).default_cfg, timm.models.get_pretrained_cfg(name)
        assert cfg.name == name and cfg.hf_hub_id == f"timm/{name}"
        wrong += [
            f"{name}.{field}: {getattr(cfg, field)!r}, timm {getattr(ref, field)!r}"
            for field in FIELDS
            if _as_compared(getattr(cfg, field)) != _as_compared(getattr(ref, field))
        ]
    # e.g. resnet50.tv_in1k is bilinear at crop 0.875, vit_small_patch16_224.dino headless
    assert wrong == [], f"{len(wrong)} differ (rerun scripts/write_pretrained_tags.py): {wrong[:5]}"
    tv = get_model_entry("resnet50.tv_in1k").default_cfg
    assert (tv.interpolation, tv.crop_pct, tv.license) == ("bilinear", 0.875, "bsd-3-clause")


def test_a_tag_timm_does_not_know_is_refused():
    with pytest.raises(UnknownModelError, match="unknown pretrained tag resnet50.foo; resnet50 has a1_in1k"):
        get_model_entry("resnet50.foo")
