"""The model FLOPs and peaks that the throughput benchmarks' TFLOP/s and MFU figures rest on."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from flops import forward_flops_per_image, peak_tflops, train_flops_per_image  # noqa: E402


def vit_multiply_adds(tokens: int, dim: int, depth: int, patch_inputs: int, classes: int) -> int:
    """A ViT's matmul multiply-adds by hand: per block qkv (3), projection (1) and an MLP of 4x
    width (8) times tokens x dim^2, plus attention's q k^T and weights x v (2 x tokens^2 x dim)."""
    block = 12 * tokens * dim**2 + 2 * tokens**2 * dim
    return depth * block + (tokens - 1) * patch_inputs * dim + dim * classes


def test_vit_flops_count_every_matmul_attention_included():
    expected = 2 * vit_multiply_adds(tokens=197, dim=384, depth=12, patch_inputs=16 * 16 * 3, classes=1000)
    assert forward_flops_per_image("vit_small_patch16_224", 224) == expected
    assert train_flops_per_image("vit_small_patch16_224", 224) == 3 * expected
    # pre-logits: the classifier's multiply-adds are all that go
    assert forward_flops_per_image("vit_small_patch16_224", 224, num_classes=0) == expected - 2 * 384 * 1000


def test_resnet_flops_match_the_published_multiply_adds():
    # ResNet-50 at 224 px: 4.09 G multiply-adds (timm's and torchvision's model cards)
    assert forward_flops_per_image("resnet50", 224) == pytest.approx(2 * 4.09e9, rel=0.005)


@pytest.mark.parametrize(
    "device_kind, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "tf32", 494.7),
        ("NVIDIA H100 PCIe", "fp32", 51.2),  # not the SXM part's 66.9
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
        ("cpu", "fp32", None),
    ],
)
def test_peak_by_device_kind(device_kind, precision, peak):
    assert peak_tflops(device_kind, precision) == peak
