"""A model with the preprocessing it was trained with, applied as one compiled, sharded function.

``from_run`` restores a fit run: its best weights and exactly the geometry, band count and
normalization the run used (recorded in ``config.json``), so a user never restates them.
``from_pretrained`` takes a model from the zoo with its ``pretrained_cfg`` (timm's eval transform).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vision_ft.cpu_runtime import compiler_options
from vision_ft.data.pipeline import ExampleSplit, Geometry, eval_geometry, sharded_eval_batches
from vision_ft.data.sources import DataOptions
from vision_ft.infer.precision import MATMUL_PRECISION, PRECISIONS
from vision_ft.models.factory import create_model
from vision_ft.train.distributed import meeting_on_first_call
from vision_ft.train.run_dir import evaluated_crop_mode, load_run_model, read_run_config
from vision_ft.train.step import data_mesh, to_global
from vision_ft.train.tta import averaged_over_views

OUTPUTS = ("logits", "embedding")


@dataclass
class Predictor:
    model: nnx.Module
    geometry: Geometry
    class_names: tuple[str, ...] | None
    data_options: DataOptions
    source: str  # what the weights are, for logs and output metadata
    tta_flip: bool = False  # evaluate as the run (or the probe's embeddings) did
    tta_shift: float = 0.0
    layer: int | None = None  # embeddings from an intermediate stage (a probe trained on them)
    multi_label: bool = False  # one sigmoid per class (a run fit on ``a|b`` labels)
    precision: str = "fp32"  # one of PRECISIONS; the model's dtype must agree (``model_dtype``)
    # the fit run the weights come from: data it names must still split as the run's did
    run_dir: Path | None = None

    @property
    def channels(self) -> int:
        return self.model.pretrained_cfg.input_size[0]

    @property
    def input_geometry(self) -> Geometry:
        """How examples are read for the model: its geometry, with the band count it takes."""
        return dataclasses.replace(self.geometry, channels=self.channels)


def model_dtype(precision: str) -> jnp.dtype:
    if precision not in MATMUL_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def from_run(run_dir: str | Path, *, which: str = "best", precision: str = "fp32") -> Predictor:
    config = read_run_config(run_dir)
    model = load_run_model(run_dir, which=which, dtype=model_dtype(precision))
    cfg = model.pretrained_cfg
    geometry = eval_geometry(cfg, config["img_size"], config.get("eval_crop_pct"), config["in_chans"])
    geometry = dataclasses.replace(geometry, eval_crop_mode=evaluated_crop_mode(config))
    window = config.get("window")
    names = tuple(config["class_names"]) if config.get("class_names") else None
    options = DataOptions(
        val_fraction=config.get("val_fraction", 0.1),
        test_fraction=config.get("test_fraction", 0.0),
        seed=config.get("seed", 0),
        data_dir=config.get("data_dir"),
        window=tuple(window) if window else None,
        class_order=names,  # the run's split, drawn class by class, as it drew it
    )
    return Predictor(
        model, geometry, names, options, f"run {run_dir}", bool(config.get("tta_flip")),
        tta_shift=config.get("tta_shift") or 0.0, multi_label=bool(config.get("multi_label")),
        precision=precision, run_dir=Path(run_dir),
    )  # fmt: skip


def from_pretrained(
    name: str,
    pretrained: bool | str,
    *,
    in_chans: int = 3,
    img_size: int | None = None,
    precision: str = "fp32",
) -> Predictor:
    model = create_model(
        name, pretrained=pretrained, in_chans=in_chans, img_size=img_size, dtype=model_dtype(precision)
    )
    cfg = model.pretrained_cfg
    geometry = eval_geometry(cfg, cfg.input_size[1], None, in_chans)
    return Predictor(model, geometry, None, DataOptions(), f"{name} ({pretrained})", precision=precision)


def compiled_forward(
    predictor: Predictor,
    output: str,
    *,
    tta_flip: bool = False,
    tta_shift: float = 0.0,
    layer: int | None = None,
    devices=None,
) -> tuple[Callable[[np.ndarray], jax.Array], int]:
    """(fn, devices): ``fn(images)`` returns ``output`` ("logits" or the pooled pre-logit
    "embedding", i.e. ``forward_head(forward_features(x), pre_logits=True)``) for a batch of images
    in [0, 1], normalized on device. With ``layer``, the embedding is instead the pooled output of
    that stage (CNNs) or block (ViTs) from ``forward_intermediates``, as float32 whatever the
    predictor's precision. One jit over a functional split of the model; the batch is sharded over
    every device, the weights replicated."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}")
    if layer is not None:
        _stage_output(predictor, layer, option="--layer")  # a stage the model lacks fails before compiling
    mesh = data_mesh(devices)
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(predictor.model)
    state = to_global(state, replicated)
    cfg = predictor.model.pretrained_cfg
    mean, std = jnp.asarray(cfg.mean, jnp.float32), jnp.asarray(cfg.std, jnp.float32)
    matmul_precision = MATMUL_PRECISION[predictor.precision]

    def apply(state, images):
        with jax.default_matmul_precision(matmul_precision):
            return normalized_forward(state, images).astype(jnp.float32)

    def normalized_forward(state, images):
        model = nnx.merge(graphdef, state)
        x = (images.astype(jnp.float32) - mean) / std

        def run(x):
            if output == "logits":
                return model(x, train=False)
            if layer is not None:
                return model.pool_intermediate(model.forward_intermediates(x)[layer])
            return model.forward_head(model.forward_features(x), pre_logits=True)

        return averaged_over_views(run, x, flip=tta_flip, shift=tta_shift)

    # replicated outputs: in a multi-process run every process holds all of them
    options = compiler_options()
    jitted = jax.jit(
        apply, in_shardings=(replicated, batched), out_shardings=replicated, compiler_options=options
    )

    run = meeting_on_first_call("predictor", jitted)

    def forward(images) -> jax.Array:
        return run(state, to_global(images, batched))

    forward.sharding = batched  # where process-local batches go (see data/pipeline.py)
    forward.lower = lambda images: jitted.lower(state, to_global(images, batched))  # for inspection
    return forward, mesh.devices.size


def embedding_dim(predictor: Predictor, layer: int | None = None) -> int:
    """The dimension of the embeddings ``compiled_forward`` gives, from shapes alone (no compute):
    what a probe must take, known before any image is read."""
    model = predictor.model
    if layer is None:
        pooled = jax.eval_shape(
            lambda x: model.forward_head(model.forward_features(x), pre_logits=True), _one_image(predictor)
        )
        return int(pooled.shape[-1])
    stage = _stage_output(predictor, layer, option="layer")
    return int(jax.eval_shape(lambda f: model.pool_intermediate(f), stage).shape[-1])


def _one_image(predictor: Predictor) -> jax.ShapeDtypeStruct:
    size = predictor.geometry.img_size
    return jax.ShapeDtypeStruct((1, size, size, predictor.channels), jnp.float32)


def _stage_output(predictor: Predictor, layer: int, *, option: str) -> jax.ShapeDtypeStruct:
    """The shape of stage (or block) ``layer``'s output; ``ValueError`` naming ``option`` where the
    model has no such stage."""
    stages = jax.eval_shape(lambda x: predictor.model.forward_intermediates(x), _one_image(predictor))
    if not -len(stages) <= layer < len(stages):
        last = len(stages) - 1
        raise ValueError(f"{option} {layer}: this model has {len(stages)} stages/blocks (0..{last})")
    return stages[layer]


def run_split(
    predictor: Predictor,
    split: ExampleSplit,
    forward: Callable[[np.ndarray], jax.Array],
    *,
    batch_size: int,
    threads: int = 4,
    workers: int = 0,
) -> Iterator[tuple[np.ndarray, dict]]:
    """(outputs of the readable examples, the batch they came from) for every batch of ``split``.
    The last batch is padded to ``batch_size`` so one compiled shape serves the whole split."""
    batches = sharded_eval_batches(
        split,
        predictor.input_geometry,
        forward.sharding,
        batch_size=batch_size,
        threads=threads,
        workers=workers,
    )
    for images, batch in batches:
        keep = batch["mask"] > 0
        yield np.asarray(forward(images))[keep], batch
