"""Shared by the throughput benchmarks: timing a step and printing the JAX-vs-PyTorch table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Both frameworks share one GPU: JAX would otherwise take 75% of its memory at start-up and leave
# PyTorch's ResNet-50 step (batch 128) too little. No effect on CPUs.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")


def interleaved_rates(
    steps: dict[str, Callable[[], object]], batch: int, warmup: int, per_round: int, rounds: int
) -> dict[str, list[float]]:
    """Images per second of each step (which must block until its work is done), per round. The
    steps take turns round by round, so that a drift of the machine (a shared 2-core VM moves by
    20% over minutes) reaches every side alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            rates[name].append(batch * per_round / (time.perf_counter() - start))
    return rates


def torch_device() -> str:
    """Where the PyTorch side runs: the GPU where there is one, as the JAX side does."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timm_model(name: str, img_size: int, **kwargs):
    """timm's ``name`` at ``img_size`` (ViTs take it as an argument; CNNs at any size)."""
    import timm

    if name.startswith("vit"):
        kwargs["img_size"] = img_size
    return timm.create_model(name, **kwargs)


def blocking(step: Callable[[], object], device: str) -> Callable[[], None]:
    """``step`` made to wait for its GPU work (CUDA kernels are launched asynchronously)."""
    import torch

    def run() -> None:
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run


PRECISIONS = ("fp32", "tf32", "bf16")


def set_matmul_precision(precision: str) -> None:
    """The same float matmul and convolution arithmetic on both sides of a GPU: true fp32, TF32
    tensor cores (JAX's GPU default; PyTorch's for convolutions only), or bf16 compute on fp32
    parameters (the fit's ``--precision bf16``; the step builders make the models bf16, and leave
    the float32 parts, the loss and optimizer, in fp32). CPUs compute fp32 for fp32 and tf32."""
    import jax
    import torch

    if jax.default_backend() == "gpu":
        jax_name = {"fp32": "float32", "tf32": "tensorfloat32", "bf16": "float32"}[precision]
        jax.config.update("jax_default_matmul_precision", jax_name)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"


def torch_autocast(device: str, precision: str):
    """PyTorch's bf16 compute for ``precision`` bf16 (autocast, as timm's ``--amp-dtype
    bfloat16`` trains), else nothing."""
    import contextlib

    import torch

    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def compare(
    description: str, jax_step_fn, torch_step_fn, *, default_batch: int, flops_fn: Callable | None = None
) -> None:
    """Parse the common options, time both sides per model, print the table, write the JSON.
    ``*_step_fn(name, batch, img_size, precision)`` build one blocking step; a row reports each side's best
    round and their ratio, and prints the ratio of every round beside it. ``flops_fn(name,
    img_size)``, the model FLOPs of one image's step, adds each side's TFLOP/s, and its MFU on a GPU
    whose peak is known (``flops.PEAK_TFLOPS``) or given (``--peak-tflops``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet50,tf_efficientnet_lite0,vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=default_batch)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps per side in each round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="both sides' arithmetic: fp32 (default), tf32 (GPU tensor cores; fp32 on CPUs) or bf16 "
        "compute on fp32 parameters",
    )  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU where it is not known")
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # what the `vision-ft` executable does first: both sides then run on the same allocator
    from vision_ft.allocator import restart_with_tcmalloc

    restart_with_tcmalloc()
    models = args.models.split(",")
    if len(models) > 1 and not args.in_process:
        # A model timed after others in the same process ran slower (ViT-S's JAX step: 2.93 img/s
        # after ResNet-50 and lite0, 3.49 alone; PyTorch's did not change), so each model gets a
        # fresh process, as a user's run would.
        report([_in_fresh_process(name, args) for name in models], args.json_path)
        return
    # what `vision-ft` does at start-up; PyTorch, in the same process, gets the same allocator
    from vision_ft.cpu_runtime import keep_freed_host_memory

    host_memory = keep_freed_host_memory()
    set_matmul_precision(args.precision)
    rows = []
    for name in models:
        steps = {
            "jax": jax_step_fn(name, args.batch, args.img_size, args.precision),
            "torch": torch_step_fn(name, args.batch, args.img_size, args.precision),
        }
        rates = interleaved_rates(steps, args.batch, args.warmup, args.steps, args.rounds)
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(rates["jax"], rates["torch"], strict=True))
        rows.append(row(name, args.batch, args.img_size, max(rates["jax"]), max(rates["torch"])))
        rows[-1]["ratio_per_round"] = per_round
        rows[-1]["host_memory"] = host_memory
        rows[-1]["precision"] = args.precision
        if flops_fn is not None:
            rows[-1].update(utilization(flops_fn(name, args.img_size), rows[-1], args))
        print(f"{name}: jax {max(rates['jax']):.2f} img/s, torch {max(rates['torch']):.2f} img/s "
              f"(best rounds); ratio per round {per_round}", flush=True)  # fmt: skip
    report(rows, args.json_path)


def _in_fresh_process(model: str, args: argparse.Namespace) -> dict:
    """This script's row for one model, timed in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, sys.argv[0], "--in-process", "--models", model, "--json", str(out)]
        for option in ("batch", "img_size", "warmup", "steps", "rounds", "precision", "peak_tflops"):
            if getattr(args, option) is not None:
                command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        (result,) = json.loads(out.read_text())
    print(f"{model}: jax {result['jax_img_s']:.2f} img/s, torch {result['torch_img_s']:.2f} img/s "
          f"(best rounds); ratio per round {result['ratio_per_round']}", flush=True)  # fmt: skip
    return result


def row(model: str, batch: int, img_size: int, jax_rate: float, torch_rate: float) -> dict:
    return dict(
        model=model, batch=batch, img_size=img_size, jax_img_s=round(jax_rate, 2),
        torch_img_s=round(torch_rate, 2), ratio=round(jax_rate / torch_rate, 3),
    )  # fmt: skip


def utilization(flops_per_image: float, result: dict, args: argparse.Namespace) -> dict:
    """Each side's achieved TFLOP/s, and its MFU where the device's peak is known."""
    import jax
    from flops import peak_tflops

    figures = {"gflop_per_img": round(flops_per_image / 1e9, 3)}
    for side in ("jax", "torch"):
        figures[f"{side}_tflop_s"] = round(result[f"{side}_img_s"] * flops_per_image / 1e12, 5)
    peak = args.peak_tflops
    if peak is None and jax.default_backend() == "gpu":
        peak = peak_tflops(jax.devices()[0].device_kind, args.precision)
    if peak:
        figures["peak_tflops"] = peak
        for side in ("jax", "torch"):
            figures[f"{side}_mfu"] = round(figures[f"{side}_tflop_s"] / peak, 4)
    return figures


def report(rows: list[dict], json_path: str | None) -> None:
    import jax
    import torch

    # the timing processes' allocator (each model's child process configured its own)
    allocator = ", ".join(sorted({r["host_memory"] for r in rows}))
    precision = ", ".join(sorted({r["precision"] for r in rows}))
    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, precision {precision}, "
          f"torch threads {torch.get_num_threads()}, host memory: {allocator}")  # fmt: skip
    print(f"{'model':28s} {'batch':>5s} {'size':>5s} {'jax img/s':>10s} {'torch img/s':>12s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['model']:28s} {r['batch']:5d} {r['img_size']:5d} {r['jax_img_s']:10.2f} "
            f"{r['torch_img_s']:12.2f} {r['ratio']:6.3f}"
        )
    for r in rows:
        if "gflop_per_img" in r:
            mfu = (
                f", MFU jax {r['jax_mfu']:.1%} torch {r['torch_mfu']:.1%} of {r['peak_tflops']} TFLOP/s"
                if "jax_mfu" in r
                else ""
            )
            print(f"{r['model']}: {r['gflop_per_img']} GFLOP per image; jax {r['jax_tflop_s'] * 1e3:.1f} "
                  f"GFLOP/s, torch {r['torch_tflop_s'] * 1e3:.1f}{mfu}")  # fmt: skip
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
