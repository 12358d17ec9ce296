"""Shared by the throughput benchmarks: timing a step and printing the JAX-vs-PyTorch table."""

from __future__ import annotations

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
