"""Per-device memory of the compiled train step under data parallelism and FSDP, from XLA's memory
analysis of the step compiled for simulated CPU devices. Nothing is allocated: the model is abstract
(``nnx.eval_shape``), so ViT-L and ConvNeXt-L fit on a small machine. AdamW, fp32, every parameter
trained, batch ``--batch`` images of ``--img-size`` px in total.

    python benchmarks/fsdp_memory.py --models vit_large_patch16_224,convnext_large \\
        --meshes data=8,data=2:fsdp=4,fsdp=8 --json OUT

Meshes are separated by commas and their axes by colons (``data=2:fsdp=4`` is ``--mesh data=2,fsdp=4``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def measure(name: str, mesh_text: str, batch: int, img_size: int) -> dict:
    import numpy as np
    from flax import nnx

    from vision_ft.models.factory import create_model
    from vision_ft.train.optimizer import build_optimizer
    from vision_ft.train.rules import build_plan
    from vision_ft.train.sharding import make_mesh
    from vision_ft.train.step import Trainer

    model = nnx.eval_shape(lambda: create_model(name, pretrained=False, num_classes=1000, img_size=img_size))
    plan = build_plan(model)
    tx = build_optimizer(plan, weight_decay=0.05)  # the step's memory does not depend on its rate
    started = time.time()
    trainer = Trainer(model, plan, tx, make_mesh(mesh_text), class_weights=np.ones(1000))
    used = trainer.step_memory((batch, img_size, img_size, 3))
    params = sum(int(np.prod(leaf.shape)) for leaf in __import__("jax").tree.leaves(trainer.trainable))
    return {
        "model": name, "mesh": mesh_text, "batch": batch, "img_size": img_size, "params": params,
        **{f"{k}_mib": round(v / 2**20, 1) for k, v in used.items()},
        "compile_s": round(time.time() - started, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_large_patch16_224,convnext_large")
    parser.add_argument("--meshes", default="data=8,data=2:fsdp=4,fsdp=8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for mesh in args.meshes.split(","):
            row = measure(name, mesh.replace(":", ","), args.batch, args.img_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<24}{'mesh':<16}{'args MiB':>10}{'temp MiB':>10}{'peak MiB':>10}{'vs data':>9}")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"])["peak_estimate_mib"]
        print(
            f"{row['model']:<24}{row['mesh']:<16}{row['arguments_mib']:>10.0f}{row['temporaries_mib']:>10.0f}"
            f"{row['peak_estimate_mib']:>10.0f}{row['peak_estimate_mib'] / base:>8.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
