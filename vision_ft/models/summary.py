"""Facts about an architecture computed without allocating its weights.

Parameter counts come from a table shipped with the package (``parameter_counts.json``, written by
``scripts/write_parameter_counts.py``): counting them from abstract shapes takes 0.2-0.9 s a model
(tracing every initializer and RNG split), 35 s for the whole zoo. Models missing from the table
(registered after it was written) are counted from abstract shapes. A test checks every entry
against the architectures.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources

import jax
from flax import nnx

from vision_ft.models.registry import get_model_entry

COUNTS_FILE = "parameter_counts.json"


@functools.cache
def _table() -> dict[str, int]:
    return json.loads(resources.files("vision_ft.models").joinpath(COUNTS_FILE).read_text())


@functools.cache
def parameter_count(name: str) -> int:
    """Trainable parameters of ``name`` at its default classes."""
    get_model_entry(name)  # an unknown name fails here, not with a bare KeyError
    count = _table().get(name)
    return count if count is not None else abstract_parameter_count(name)


def abstract_parameter_count(name: str) -> int:
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
