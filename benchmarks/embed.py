"""Embedding throughput: vision-ft's compiled, sharded embedding step against timm's
``forward_head(forward_features(x), pre_logits=True)`` in PyTorch (eager, ``inference_mode``), on the
same machine (the GPU where there is one), same batch, resolution and precision (fp32 by default;
``--precision tf32`` or ``bf16`` on a GPU). Prints a table, with each side's TFLOP/s of model FLOPs
and, on a GPU whose peak is known, its MFU; ``--json OUT`` writes the rows.

    python benchmarks/embed.py --models resnet50,tf_efficientnet_lite0,vit_small_patch16_224 --json OUT
"""

from __future__ import annotations

import numpy as np
from flops import forward_flops_per_image
from throughput import blocking, compare, timm_model, torch_autocast, torch_device


def jax_step(name: str, batch: int, img_size: int, precision: str):
    import jax
    import jax.numpy as jnp

    from vision_ft.data.pipeline import Geometry
    from vision_ft.data.sources import DataOptions
    from vision_ft.infer.predictor import Predictor, compiled_forward
    from vision_ft.models.factory import create_model

    model = create_model(name, img_size=img_size, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)
    predictor = Predictor(model, Geometry(img_size), None, DataOptions(), name)
    forward, _ = compiled_forward(predictor, "embedding")
    images = np.random.default_rng(0).random((batch, img_size, img_size, 3), dtype=np.float32)
    images = jax.device_put(images, forward.sharding)  # as the torch side's: no copy is timed
    return lambda: jax.block_until_ready(forward(images))


def torch_step(name: str, batch: int, img_size: int, precision: str):
    import torch

    device = torch_device()
    model = timm_model(name, img_size).eval().to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)

    def step():
        with torch.inference_mode(), torch_autocast(device, precision):
            model.forward_head(model.forward_features(images), pre_logits=True)

    return blocking(step, device)


def main() -> None:
    def embedding_flops(name: str, img_size: int) -> float:
        return forward_flops_per_image(name, img_size, num_classes=0)  # pre-logits: no classifier

    compare(__doc__, jax_step, torch_step, default_batch=64, flops_fn=embedding_flops)


if __name__ == "__main__":
    main()
