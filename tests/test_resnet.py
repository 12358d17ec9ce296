import pytest

from tests.parity import assert_parity

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d"]


@pytest.mark.parametrize("name", NAMES)
def test_resnet_matches_timm(name, tmp_path):
    assert_parity(name, tmp_path, img_size=64)
