"""Small synthetic datasets and configs for engine tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from vision_ft.data.pipeline import train_batches
from vision_ft.train.config import load_config
from vision_ft.weights.mapping import format_path


def write_synthetic_npz(
    path: Path, *, sizes=(96, 32, 32), side: int = 16, channels: int = 1, seed: int = 0, classes: int = 2
) -> Path:
    """Classes a model can learn: images of classes >= 1 are brighter in their upper half."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        labels = rng.integers(0, classes, n)
        images = rng.integers(40, 120, (n, side, side, channels)).astype(np.uint8)
        images[labels >= 1, : side // 2] += 80
        arrays[f"{split}_images"] = images[..., 0] if channels == 1 else images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def tiny_config(tmp_path: Path, **overrides):
    data = write_synthetic_npz(tmp_path / "data.npz")
    values = dict(
        model="test_resnet",  # timm's 0.47 M-parameter ResNet: the engine, not the model, is under test
        pretrained="false",
        data=f"npz:{data}",
        img_size=32,
        epochs=2,
        batch_size=16,
        eval_batch_size=16,
        lr=1e-3,
        warmup_epochs=0.5,
        drop_path_rate=0.1,
        output=str(tmp_path / "run"),
    )
    values.update(overrides)
    return load_config(None, values)


def numpy_state(model, kind):
    """A model's variables of one kind (nnx.Param, nnx.BatchStat) as numpy arrays by dotted path."""
    return {format_path(p): np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def train_batch(run, step: int):
    """The train batch of ``step``, as (images, labels, mask)."""
    batch = next(
        train_batches(
            run.data.splits["train"], run.train_geometry, batch_size=16, seed=0, start_step=step,
            total_steps=step + 1,
        )
    )  # fmt: skip
    return batch["image"], batch["label"], batch["mask"]
