"""Train-step throughput: vision-ft's compiled JAX step against PyTorch timm (eager), same machine.

Same batch, resolution, precision (fp32 by default; ``--precision tf32`` or ``bf16`` on a GPU) and
AdamW on both sides; every parameter trainable. Prints a table and
optionally writes ``[{model, batch, img_size, jax_img_s, torch_img_s, ratio}]`` as JSON.

    python benchmarks/train_step.py --models resnet50,tf_efficientnet_lite0,vit_small_patch16_224 --json OUT
"""

from __future__ import annotations

import numpy as np
from flops import train_flops_per_image
from throughput import blocking, compare, timm_model, torch_autocast, torch_device


def jax_step(name: str, batch: int, img_size: int, precision: str):
    import jax
    import jax.numpy as jnp
    import optax

    import vision_ft
    from vision_ft.train.rules import build_plan
    from vision_ft.train.step import Augment, Trainer, data_mesh

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32  # as `fit --precision bf16` builds it
    model = vision_ft.create_model(name, num_classes=1000, img_size=img_size, dtype=dtype)
    plan = build_plan(model)
    tx = optax.adamw(1e-4, weight_decay=0.05)
    trainer = Trainer(
        model,
        plan,
        tx,
        data_mesh(),
        class_weights=np.ones(1000),
        augment=Augment(hflip=False, vflip=False, translate=0.0),
    )
    rng = np.random.default_rng(0)
    # on the device once, as the torch side's batch is: neither side times a host-to-device copy
    images, labels, mask = jax.device_put(
        (
            rng.integers(0, 256, (batch, img_size, img_size, 3), dtype=np.uint8),
            rng.integers(0, 1000, batch),
            np.ones(batch, np.float32),
        ),
        trainer.batch_sharding,
    )
    counter = iter(range(10**9))

    def step():
        jax.block_until_ready(trainer.train_step(images, labels, mask, next(counter))["loss"])

    return step


def torch_step(name: str, batch: int, img_size: int, precision: str):
    import torch

    device = torch_device()
    model = timm_model(name, img_size, num_classes=1000).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch_autocast(device, precision):
            loss = loss_fn(model(images), labels)
        loss.backward()
        opt.step()

    return blocking(step, device)


def main() -> None:
    compare(__doc__, jax_step, torch_step, default_batch=32, flops_fn=train_flops_per_image)


if __name__ == "__main__":
    main()
