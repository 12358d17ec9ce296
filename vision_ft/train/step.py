"""jit-compiled, data-parallel train and eval steps over a functional split of the NNX model.

The model is split once into ``trainable`` params, ``frozen`` params, BatchNorm ``stats`` and the
rest (RNG streams). Gradients are taken with respect to ``trainable`` only, so frozen parameters
cost no gradient and hold no optimizer state. Each step merges the pieces inside ``jax.jit``
(no ``nnx.jit`` in the hot loop), donates the buffers it replaces, and sees one static batch
shape, so nothing recompiles after the first step. The batch is sharded over the mesh's ``data``
axis and everything else is replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vision_ft.models.layers import BatchNorm
from vision_ft.train.rules import ParamSetting
from vision_ft.weights.mapping import format_path


@dataclass(frozen=True)
class Augment:
    hflip: bool = True
    vflip: bool = False
    translate: float = 0.0


def data_mesh(devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    return Mesh(devices.reshape(-1), ("data",))


def freeze_batchnorm(model: nnx.Module, plan: Mapping[str, ParamSetting], *, enabled: bool = True) -> int:
    """Make BatchNorm layers whose parameters are all frozen run on (and keep) their running
    statistics; every other BatchNorm trains normally. Returns how many layers were frozen."""
    count = 0
    for path, module in nnx.iter_graph(model):
        if isinstance(module, BatchNorm):
            prefix = format_path(path)
            owned = [s for p, s in plan.items() if p.rsplit(".", 1)[0] == prefix]
            module.frozen_stats = enabled and bool(owned) and not any(s.trainable for s in owned)
            count += module.frozen_stats
    return count


def augment_batch(images: jax.Array, key: jax.Array, aug: Augment) -> jax.Array:
    """Random flips and shifts (reflect-padded) per image; uint8 NHWC in, float in [0, 1] out."""
    x = images.astype(jnp.float32) / 255.0
    n, h, w, _ = x.shape
    k_h, k_v, k_t = jax.random.split(key, 3)
    if aug.hflip:
        flip = jax.random.bernoulli(k_h, 0.5, (n, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1], x)
    if aug.vflip:
        flip = jax.random.bernoulli(k_v, 0.5, (n, 1, 1, 1))
        x = jnp.where(flip, x[:, ::-1], x)
    pad = int(round(aug.translate * min(h, w)))
    if pad:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        offsets = jax.random.randint(k_t, (n, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1])))(
            padded, offsets
        )
    return x


class Trainer:
    """Owns the split model state and the compiled steps for one mesh."""

    def __init__(
        self,
        model: nnx.Module,
        plan: Mapping[str, ParamSetting],
        tx: optax.GradientTransformation,
        mesh: Mesh,
        *,
        class_weights: np.ndarray,
        label_smoothing: float = 0.0,
        augment: Augment = Augment(),
        seed: int = 0,
    ):
        trainable_paths = frozenset(p for p, s in plan.items() if s.trainable)

        def is_trainable(path, value) -> bool:
            return isinstance(value, nnx.Param) and format_path(path) in trainable_paths

        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        cfg = model.pretrained_cfg
        mean = jnp.asarray(cfg.mean, jnp.float32)
        std = jnp.asarray(cfg.std, jnp.float32)
        graphdef, trainable, frozen, stats, other = nnx.split(
            model, is_trainable, nnx.Param, nnx.BatchStat, ...
        )
        self.graphdef = graphdef
        put = lambda tree: jax.device_put(tree, self.replicated)  # noqa: E731
        self.trainable, self.frozen, self.stats, self.other = (
            put(trainable),
            put(frozen),
            put(stats),
            put(other),
        )
        self.opt_state = put(tx.init(self.trainable))
        self.class_weights = put(jnp.asarray(class_weights, jnp.float32))
        base_key = jax.random.key(seed)
        has_dropout = any(isinstance(v, nnx.RngKey) for _, v in nnx.to_flat_state(other))

        def reseed(trainable, frozen, stats, other, key):
            # dropout/drop-path noise is a function of (seed, step): resuming replays it exactly
            model = nnx.merge(graphdef, trainable, frozen, stats, other)
            nnx.reseed(model, dropout=key)
            return nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.BatchStat)))

        def loss_fn(trainable, frozen, stats, other, images, labels, mask, aug_key):
            # fresh Variables owned by this trace, so BatchNorm may update them here
            frozen, stats, other = jax.tree.map(lambda v: v, (frozen, stats, other))
            model = nnx.merge(graphdef, trainable, frozen, stats, other)
            x = (augment_batch(images, aug_key, augment) - mean) / std
            logits = model(x, train=True).astype(jnp.float32)
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
            weights = self.class_weights[labels] * mask
            loss = jnp.sum(optax.softmax_cross_entropy(logits, targets) * weights) / jnp.maximum(
                weights.sum(), 1e-6
            )
            return loss, nnx.state(model, nnx.BatchStat)

        def train_step(trainable, opt_state, stats, frozen, other, images, labels, mask, step):
            aug_key, drop_key = jax.random.split(jax.random.fold_in(base_key, step))
            if has_dropout:
                other = reseed(trainable, frozen, stats, other, drop_key)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, frozen, stats, other, images, labels, mask, aug_key
            )
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            return trainable, opt_state, new_stats, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        def eval_step(trainable, stats, frozen, other, images):
            model = nnx.merge(graphdef, trainable, frozen, stats, other)
            x = (images.astype(jnp.float32) / 255.0 - mean) / std
            return model(x, train=False).astype(jnp.float32)

        rep, data = self.replicated, self.batch_sharding
        self._train_step = jax.jit(
            train_step,
            in_shardings=(rep, rep, rep, rep, rep, data, data, data, rep),
            out_shardings=(rep, rep, rep, rep),
            donate_argnums=(0, 1, 2),
        )
        self._eval_step = jax.jit(eval_step, in_shardings=(rep, rep, rep, rep, data), out_shardings=data)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def train_step(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, step: int) -> dict:
        batch = jax.device_put((images, labels, mask), self.batch_sharding)
        self.trainable, self.opt_state, self.stats, metrics = self._train_step(
            self.trainable, self.opt_state, self.stats, self.frozen, self.other, *batch, jnp.int32(step)
        )
        return metrics

    def predict(self, images: np.ndarray) -> jax.Array:
        return self._eval_step(
            self.trainable, self.stats, self.frozen, self.other, jax.device_put(images, self.batch_sharding)
        )

    def write_back(self, model: nnx.Module) -> None:
        """Copy the trained state into ``model`` (e.g. to save or embed with it)."""
        nnx.update(model, self.trainable, self.frozen, self.stats)
