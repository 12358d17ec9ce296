import pytest
import timm

from tests.parity import assert_parity, assert_structure_matches, register_shortened
from vision_ft.models.registry import get_model_entry

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d", "test_resnet"]


@pytest.mark.parametrize("name", NAMES)
def test_resnet_matches_timm(name, tmp_path, monkeypatch):
    if name in ("resnet101", "resnet152"):
        # their 23 / 36 third-stage blocks checked on shapes, the numbers on one block per stage
        assert assert_structure_matches(name, timm_kwargs={}) > 300
        register_shortened(monkeypatch, name, layers=(1, 1, 1, 1))
        assert_parity(name, tmp_path, img_size=64, timm_kwargs=dict(layers=(1, 1, 1, 1)), ours_kwargs={})
        return
    assert_parity(name, tmp_path, img_size=64)


@pytest.mark.parametrize("name", NAMES)
def test_resnet_pretrained_cfg_matches_timm(name):
    cfg, ref = get_model_entry(name).default_cfg, timm.models.get_pretrained_cfg(name)
    assert (cfg.tag, cfg.hf_hub_id) == (ref.tag, f"timm/{name}.{ref.tag}")
    assert (cfg.input_size, cfg.interpolation) == (ref.input_size, ref.interpolation)
    assert cfg.crop_pct == ref.crop_pct
    assert (cfg.mean, cfg.std) == (tuple(ref.mean), tuple(ref.std))
    assert (cfg.first_conv, cfg.classifier, cfg.license) == (ref.first_conv, ref.classifier, ref.license)
