"""Embedding throughput: vision-ft's compiled, sharded embedding step against timm's
``forward_head(forward_features(x), pre_logits=True)`` in PyTorch (eager, ``inference_mode``), on the
same machine, same batch and resolution, fp32. Prints a table; ``--json OUT`` writes the rows.

    python benchmarks/embed.py --models resnet50,tf_efficientnet_lite0,vit_small_patch16_224 --json OUT
"""

from __future__ import annotations

import argparse

import numpy as np
from throughput import images_per_second, report, row


def jax_images_per_second(name: str, batch: int, img_size: int, warmup: int, steps: int) -> float:
    import jax

    from vision_ft.data.pipeline import Geometry
    from vision_ft.data.sources import DataOptions
    from vision_ft.infer.predictor import Predictor, compiled_forward
    from vision_ft.models.factory import create_model

    model = create_model(name, img_size=img_size)
    predictor = Predictor(model, Geometry(img_size), None, DataOptions(), name)
    forward, _ = compiled_forward(predictor, "embedding")
    images = np.random.default_rng(0).random((batch, img_size, img_size, 3), dtype=np.float32)
    return images_per_second(lambda: jax.block_until_ready(forward(images)), batch, warmup, steps)


def torch_images_per_second(name: str, batch: int, img_size: int, warmup: int, steps: int) -> float:
    import timm
    import torch

    kwargs = {"img_size": img_size} if name.startswith("vit") else {}
    model = timm.create_model(name, **kwargs).eval()
    images = torch.randn(batch, 3, img_size, img_size)

    def step():
        with torch.inference_mode():
            model.forward_head(model.forward_features(images), pre_logits=True)

    return images_per_second(step, batch, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet50,tf_efficientnet_lite0,vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        ours = jax_images_per_second(name, args.batch, args.img_size, args.warmup, args.steps)
        theirs = torch_images_per_second(name, args.batch, args.img_size, args.warmup, args.steps)
        rows.append(row(name, args.batch, args.img_size, ours, theirs))
        print(f"{name}: jax {ours:.1f} img/s, torch {theirs:.1f} img/s", flush=True)
    report(rows, args.json_path)


if __name__ == "__main__":
    main()
