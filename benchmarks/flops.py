"""Model FLOPs per image, and the peak FLOP/s of known GPUs: what MFU is measured against.

Model FLOPs, not the FLOPs a step happens to execute: the matmuls and convolutions of timm's forward
pass, as PyTorch's ``FlopCounterMode`` counts them (a multiply-add is 2 FLOPs; normalization,
activations and softmax are left out, as in published model FLOPs and MFU), and for a train step 3x
that, the backward pass costing about twice the forward (the convention of PaLM's MFU, Chowdhery et
al. 2022, appendix B). Both frameworks are measured against the same count, so rematerialisation or
a custom gradient neither adds work nor hides it. vision-ft's models are exact ports of timm's, so
the architecture counted is the one timed.
"""

from __future__ import annotations

# Dense peak TFLOP/s from NVIDIA's datasheets: fp32 on CUDA cores, tf32 and bf16 on tensor cores
# (the datasheets' "with sparsity" figures halved). Matched against jax's device_kind, in order.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
)


def peak_tflops(device_kind: str, precision: str) -> float | None:
    """The device's dense peak for ``precision`` (fp32, tf32, bf16), or None where unknown (CPUs:
    their peak depends on the ISA, clock and cores the VM gives, so they get achieved FLOP/s only)."""
    for name, peaks in PEAK_TFLOPS:
        if name in device_kind:
            return peaks[precision]
    return None


def forward_flops_per_image(name: str, img_size: int, *, num_classes: int = 1000) -> float:
    """FLOPs of one image through timm's ``name`` (``num_classes=0``: up to the pooled pre-logits)."""
    import torch
    from throughput import timm_model
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = timm_model(name, img_size, num_classes=num_classes).eval()
    counter = FlopCounterMode(display=False)
    # attention as its two batched matmuls: the counter has no formula for the fused CPU kernel
    # and would leave them out (0.7 of ViT-S's 9.2 GFLOPs)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, 3, img_size, img_size))
    return float(counter.get_total_flops())


def train_flops_per_image(name: str, img_size: int) -> float:
    return 3 * forward_flops_per_image(name, img_size)
