"""Shared by the throughput benchmarks: timing a step and printing the JAX-vs-PyTorch table."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable


def images_per_second(step: Callable[[], object], batch: int, warmup: int, steps: int) -> float:
    """Images per second of ``step`` (which must block until its work is done) after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def compare(description: str, jax_rate_fn, torch_rate_fn, *, default_batch: int) -> None:
    """Parse the common options, time both sides per model, print the table, write the JSON."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet50,tf_efficientnet_lite0,vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=default_batch)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    # what `vision-ft` does at start-up; PyTorch, in the same process, gets the same allocator
    from vision_ft.cpu_runtime import keep_freed_host_memory

    keep_freed_host_memory()
    rows = []
    for name in args.models.split(","):
        ours = jax_rate_fn(name, args.batch, args.img_size, args.warmup, args.steps)
        theirs = torch_rate_fn(name, args.batch, args.img_size, args.warmup, args.steps)
        rows.append(row(name, args.batch, args.img_size, ours, theirs))
        print(f"{name}: jax {ours:.1f} img/s, torch {theirs:.1f} img/s", flush=True)
    report(rows, args.json_path)


def row(model: str, batch: int, img_size: int, jax_rate: float, torch_rate: float) -> dict:
    return dict(
        model=model, batch=batch, img_size=img_size, jax_img_s=round(jax_rate, 2),
        torch_img_s=round(torch_rate, 2), ratio=round(jax_rate / torch_rate, 3),
    )  # fmt: skip


def report(rows: list[dict], json_path: str | None) -> None:
    import jax
    import torch

    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'model':28s} {'batch':>5s} {'size':>5s} {'jax img/s':>10s} {'torch img/s':>12s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['model']:28s} {r['batch']:5d} {r['img_size']:5d} {r['jax_img_s']:10.2f} "
            f"{r['torch_img_s']:12.2f} {r['ratio']:6.3f}"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
