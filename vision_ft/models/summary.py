"""Facts about an architecture computed without allocating its weights."""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx

from vision_ft.models.registry import get_model_entry


@functools.cache
def parameter_count(name: str) -> int:
    """Trainable parameters of ``name`` at its default classes, from abstract shapes only."""
    entry = get_model_entry(name)
    cfg = entry.default_cfg
    abstract = nnx.eval_shape(
        lambda: entry.build(
            num_classes=cfg.num_classes,
            in_chans=3,
            img_size=tuple(cfg.input_size[1:]),
            drop_path_rate=0.0,
            dtype=jax.numpy.float32,
            param_dtype=jax.numpy.float32,
            rngs=nnx.Rngs(0),
        )
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
