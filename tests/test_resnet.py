import pytest

from tests.parity import (
    assert_parity,
    assert_pretrained_cfg_matches_timm,
    assert_structure_matches,
    register_shortened,
)

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
    # the ResNet port registers a subset of the tags timm lists for each architecture
    assert_pretrained_cfg_matches_timm(name, every_tag=False)
