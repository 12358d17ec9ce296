"""jit-compiled, data-parallel train and eval steps over a functional split of the NNX model.

The model is split once into ``trainable`` params, ``frozen`` params, BatchNorm ``stats`` and the
rest (RNG streams). Gradients are taken with respect to ``trainable`` only, so frozen parameters
cost no gradient and hold no optimizer state. Each step merges the pieces inside ``jax.jit``
(no ``nnx.jit`` in the hot loop), donates the buffers it replaces, and sees one static batch
shape, so nothing recompiles after the first step. The batch is sharded over every device of the
mesh; the model state is replicated, or with an ``fsdp`` mesh axis sharded over it (train/sharding.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vision_ft.cpu_runtime import compiler_options
from vision_ft.models.layers import BatchNorm, batch_statistics_over
from vision_ft.train.config import EMA_WARMUPS
from vision_ft.train.distributed import meeting_on_first_call
from vision_ft.train.optimizer import UpdateWindows
from vision_ft.train.rules import ParamSetting
from vision_ft.train.sharding import DEFAULT_MIN_SIZE, in_process_order, state_shardings
from vision_ft.train.tta import averaged_over_views, reflect_padded
from vision_ft.weights.mapping import format_path


@dataclass(frozen=True)
class Augment:
    """On-device, per-image augmentation (host-side random resized crops live in data/pipeline.py)."""

    hflip: bool = True
    vflip: bool = False
    rot90: bool = False  # for orientation-free imagery: satellite tiles, histology
    translate: float = 0.0  # max shift as a fraction of the side, reflect-padded
    color_jitter: float = 0.0  # brightness/contrast(/saturation) strength; 1- and 3-band images
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 disables
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 disables


def to_global(tree, sharding, *, owned: bool = False):
    """Values every process holds in full -> global arrays laid out as ``sharding`` (one sharding,
    or a tree of them matching ``tree``). One process: ``jax.device_put``; several: each process
    supplies its own devices' shards (device_put cannot address other processes' devices). Arrays
    that are already global keep their layout, or are resharded when it differs.

    ``owned``: never the caller's own buffers, as device_put returns an array already in place on
    one device: a step that donates them would delete the arrays a model still holds."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding, may_alias=False if owned else None)
    if isinstance(sharding, NamedSharding):
        sharding = jax.tree.map(lambda _: sharding, tree)

    def one(x, where: NamedSharding):
        def from_full(x: np.ndarray) -> jax.Array:
            return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == where else jax.jit(lambda v: v, out_shardings=where)(x)
        if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                from_full(np.asarray(jax.random.key_data(x))), impl=jax.random.key_impl(x)
            )
        return from_full(np.asarray(x))

    return jax.tree.map(one, tree, sharding)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def data_mesh(devices=None) -> Mesh:
    """A 1-D ``data`` mesh over every device: inference, where weights are always replicated."""
    devices = np.asarray(in_process_order(devices if devices is not None else jax.devices()))
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
    """Random flips, quarter turns, shifts and colour jitter per image; float NHWC in [0, 1] out."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    n, h, w, c = x.shape
    k_h, k_v, k_r, k_t, k_c = jax.random.split(key, 5)

    def per_image(flag, a, b):
        return jnp.where(flag.reshape(n, 1, 1, 1), a, b)

    if aug.hflip:
        x = per_image(jax.random.bernoulli(k_h, 0.5, (n,)), x[:, :, ::-1], x)
    if aug.vflip:
        x = per_image(jax.random.bernoulli(k_v, 0.5, (n,)), x[:, ::-1], x)
    if aug.rot90 and h == w:
        turns = jax.random.randint(k_r, (n,), 0, 4)
        quarter = jnp.swapaxes(x, 1, 2)[:, ::-1]  # 90 degrees counter-clockwise
        half = x[:, ::-1, ::-1]
        three = jnp.swapaxes(x, 1, 2)[:, :, ::-1]
        x = per_image(turns == 1, quarter, per_image(turns == 2, half, per_image(turns == 3, three, x)))
    pad = int(round(aug.translate * min(h, w)))
    if pad:
        padded = reflect_padded(x, pad)
        offsets = jax.random.randint(k_t, (n, 2), 0, 2 * pad + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    if aug.color_jitter and c in (1, 3):
        x = _color_jitter(x, k_c, aug.color_jitter)
    return x


def _color_jitter(x: jax.Array, key: jax.Array, strength: float) -> jax.Array:
    """torchvision-style brightness, contrast and saturation factors in [1 - s, 1 + s], in that order;
    one-band images get brightness and contrast (torchvision's saturation leaves gray images as they are)."""
    n, rgb = x.shape[0], x.shape[-1] == 3

    def luma(img: jax.Array) -> jax.Array:
        return img @ jnp.asarray([0.299, 0.587, 0.114], img.dtype) if rgb else img[..., 0]

    factors = jax.random.uniform(key, (3, n, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
    x = jnp.clip(x * factors[0], 0, 1)
    mean = luma(x).mean(axis=(1, 2), keepdims=True)[..., None]
    x = jnp.clip((x - mean) * factors[1] + mean, 0, 1)
    if not rgb:
        return x
    gray = luma(x)[..., None]
    return jnp.clip((x - gray) * factors[2] + gray, 0, 1)


def mix_batch(
    x: jax.Array, targets: jax.Array, weights: jax.Array, key: jax.Array, aug: Augment
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """timm's batch-mode mixup/cutmix: each image mixed with the batch reversed, one lambda per step
    (cutmix's lambda corrected to the pasted box's true area); picks one of the two when both are on."""
    k_choice, k_lam, k_box = jax.random.split(key, 3)
    use_cutmix = jnp.asarray(aug.cutmix > 0)
    if aug.mixup > 0 and aug.cutmix > 0:
        use_cutmix = jax.random.bernoulli(k_choice, 0.5)
    alpha = jnp.where(use_cutmix, max(aug.cutmix, 1e-3), max(aug.mixup, 1e-3))
    lam = jax.random.beta(k_lam, alpha, alpha)
    n, h, w, _ = x.shape
    partner = x[::-1]
    # cutmix box of area (1 - lam), clipped at the borders
    cut_h, cut_w = jnp.sqrt(1 - lam) * h, jnp.sqrt(1 - lam) * w
    cy, cx = jax.random.uniform(k_box, (2,)) * jnp.asarray([h, w])
    top, bottom = jnp.clip(cy - cut_h / 2, 0, h).astype(int), jnp.clip(cy + cut_h / 2, 0, h).astype(int)
    left, right = jnp.clip(cx - cut_w / 2, 0, w).astype(int), jnp.clip(cx + cut_w / 2, 0, w).astype(int)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = ((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right))[None, :, :, None]
    box_lam = 1 - (bottom - top) * (right - left) / (h * w)
    mixed = jnp.where(use_cutmix, jnp.where(inside, partner, x), lam * x + (1 - lam) * partner)
    lam = jnp.where(use_cutmix, box_lam, lam)
    targets = lam * targets + (1 - lam) * targets[::-1]
    weights = lam * weights + (1 - lam) * weights[::-1]
    return mixed, targets, weights


def ema_decay_at(step: jax.Array, decay: float, warmup: str) -> jax.Array:
    """The EMA's decay at its update after optimizer update ``step`` (0-based; the train step where
    gradients do not accumulate); ``warmup`` (EMA_WARMUPS) says how it rises to ``decay``. timm's
    modes copy the weights at the first update, as its ModelEmaV3 does, so the average never keeps
    the new head's random init."""
    step = jnp.asarray(step, jnp.float32)
    if warmup == "count":  # TF's ExponentialMovingAverage(num_updates=step): 0.1 at the first
        return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    if warmup == "power":  # timm's use_warmup, gamma 1 and power 2/3
        ramped = jnp.minimum(decay, 1.0 - (1.0 + step) ** (-2.0 / 3.0))
    elif warmup == "none":
        ramped = jnp.asarray(decay, jnp.float32)
    else:
        raise ValueError(f"ema_warmup must be one of {', '.join(EMA_WARMUPS)}, not {warmup!r}")
    return jnp.where(step > 0, ramped, 0.0)


def multilabel_loss(logits: jax.Array, targets: jax.Array, pos_weight: jax.Array) -> jax.Array:
    """Per-example sigmoid cross-entropy averaged over classes, positives weighted by ``pos_weight``
    (PyTorch's ``BCEWithLogitsLoss(pos_weight=...)``, reduced per example)."""
    per_class = -(
        pos_weight * targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
    )
    return per_class.mean(axis=-1)


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
        learning_rate: float | Callable[[int], float] = 1.0,
        ema_decay: float = 0.0,
        ema_warmup: str = "power",
        ema_first_step: int = 0,
        windows: UpdateWindows | None = None,
        tta_flip: bool = False,
        tta_shift: float = 0.0,
        multi_label: bool = False,
        fsdp_min_size: int = DEFAULT_MIN_SIZE,
        mask_batch_statistics: bool = False,
    ):
        trainable_paths = frozenset(p for p, s in plan.items() if s.trainable)

        def is_trainable(path, value) -> bool:
            return isinstance(value, nnx.Param) and format_path(path) in trainable_paths

        # a factor on tx's updates (1 where tx has its own rate), or that factor as a function of
        # the step: evaluated on the host and passed to the compiled step, which so stays the same
        # for every schedule (see vision_ft.train.optimizer)
        self.learning_rate = learning_rate if callable(learning_rate) else (lambda step: learning_rate)
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        # a (data, fsdp) mesh splits the batch over both axes; a 1-D data mesh over its one axis
        self.batch_sharding = NamedSharding(mesh, P(mesh.axis_names))
        cfg = model.pretrained_cfg
        mean = jnp.asarray(cfg.mean, jnp.float32)
        std = jnp.asarray(cfg.std, jnp.float32)
        graphdef, trainable, frozen, stats, other = nnx.split(
            model, is_trainable, nnx.Param, nnx.BatchStat, ...
        )
        self.graphdef, self._is_trainable = graphdef, is_trainable
        layout = functools.partial(state_shardings, mesh=mesh, min_size=fsdp_min_size)
        if "fsdp" not in mesh.axis_names:
            layout = lambda tree: jax.tree.map(lambda _: self.replicated, tree)  # noqa: E731
        self.shardings = {
            "trainable": layout(trainable), "frozen": layout(frozen), "stats": layout(stats),
            "other": jax.tree.map(lambda _: self.replicated, other),
            "opt_state": layout(jax.eval_shape(tx.init, trainable)),
        }  # fmt: skip
        sh = self.shardings
        # an abstract model (from nnx.eval_shape) gives a trainer that can only be compiled and
        # measured (step_memory): how much a large model needs per device, without allocating it
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(trainable))
        place = _with_shardings if self.abstract else functools.partial(to_global, owned=True)
        self.trainable, self.frozen, self.stats, self.other = (
            place(trainable, sh["trainable"]),
            place(frozen, sh["frozen"]),
            place(stats, sh["stats"]),
            place(other, sh["other"]),
        )
        if self.abstract:
            self.opt_state = _with_shardings(jax.eval_shape(tx.init, trainable), sh["opt_state"])
        else:  # created in place, each device holding only its shard
            self.opt_state = jax.jit(tx.init, out_shardings=sh["opt_state"])(self.trainable)
        # timm's model EMA: an average of the trained weights and BatchNorm statistics, evaluated and
        # kept as the best checkpoint instead of the raw weights
        self.ema_decay = ema_decay
        # where tx accumulates gradients, it updates at the steps that close a window; the EMA
        # follows the updates, not the micro-steps, as timm's does
        self.windows = windows
        self.ema_first_step = ema_first_step  # the train step where this average starts (a phase's)
        self.ema = (
            jax.tree.map(jnp.copy, (self.trainable, self.stats))
            if ema_decay > 0 and not self.abstract
            else None
        )
        # single-label: a weight per class; multi-label: each class's weight of positives (pos_weight)
        self.class_weights = to_global(jnp.asarray(class_weights, jnp.float32), self.replicated)
        num_classes = len(class_weights)
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
            aug_key, mix_key = jax.random.split(aug_key)
            x = augment_batch(images, aug_key, augment)
            if multi_label:
                # each class is its own two-way problem, smoothed towards 1/2
                targets = labels.astype(jnp.float32) * (1 - label_smoothing) + label_smoothing / 2
                weights = mask
            else:
                weights = self.class_weights[labels] * mask
                # each class's share of the target carries that class's weight, as torch's
                # CrossEntropyLoss(weight=, label_smoothing=) weighs its smoothing term, normalized by
                # the true classes' weights; mixup then weighs each image's share by its own class
                # (mixing a weight of 9 and one of 1 into 5 for a half-and-half target weighs them 1:1)
                one_hot = jax.nn.one_hot(labels, num_classes)
                smoothed = optax.smooth_labels(one_hot, label_smoothing)
                targets = smoothed * self.class_weights[None, :] * mask[:, None]
            usable = mask
            if augment.mixup > 0 or augment.cutmix > 0:
                x, targets, weights = mix_batch(x, targets, weights, mix_key, augment)
                # an image mixed with an unusable one (mask 0, a blank) is not an example either
                usable = mask * mask[::-1]
                weights = weights * usable
                if not multi_label:
                    targets = targets * usable[:, None]
            # nor does a blank move BatchNorm's statistics, where the data can hold blanks at all:
            # the weighted statistics cost 4% of tf_efficientnet_lite0's step
            statistics = batch_statistics_over(usable) if mask_batch_statistics else contextlib.nullcontext()
            with statistics:
                logits = model((x - mean) / std, train=True).astype(jnp.float32)
            if multi_label:
                weighted_losses = multilabel_loss(logits, targets, self.class_weights) * weights
            else:
                weighted_losses = optax.softmax_cross_entropy(logits, targets)
            loss = jnp.sum(weighted_losses) / jnp.maximum(weights.sum(), 1e-6)
            return loss, nnx.state(model, nnx.BatchStat)

        def train_step(trainable, opt_state, stats, frozen, other, images, labels, mask, step, learning_rate):
            aug_key, drop_key = jax.random.split(jax.random.fold_in(base_key, step))
            if has_dropout:
                other = reseed(trainable, frozen, stats, other, drop_key)
            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, frozen, stats, other, images, labels, mask, aug_key
            )
            updates, opt_state = tx.update(grads, opt_state, trainable)
            updates = jax.tree.map(lambda u: u * learning_rate.astype(u.dtype), updates)
            trainable = optax.apply_updates(trainable, updates)
            return trainable, opt_state, new_stats, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        def eval_step(trainable, stats, frozen, other, images, *, shift):
            model = nnx.merge(graphdef, trainable, frozen, stats, other)
            x = images.astype(jnp.float32)
            if images.dtype == jnp.uint8:
                x = x / 255.0
            x = (x - mean) / std
            return averaged_over_views(lambda view: model(view, train=False), x, flip=tta_flip, shift=shift)

        def ema_update(ema, trainable, stats, step):
            decay = ema_decay_at(step, ema_decay, ema_warmup)
            # e + (v - e)(1 - decay): a value that does not change (a frozen BatchNorm statistic)
            # stays bitwise the same, which e * decay + v * (1 - decay) does not guarantee
            return jax.tree.map(
                lambda e, v: e + (v.astype(e.dtype) - e) * (1 - decay), ema, (trainable, stats)
            )

        rep, data = self.replicated, self.batch_sharding
        t, o, st, f, ot = (sh[k] for k in ("trainable", "opt_state", "stats", "frozen", "other"))
        options = compiler_options()
        self._train_step = jax.jit(
            train_step,
            in_shardings=(t, o, st, f, ot, data, data, data, rep, rep),
            out_shardings=(t, o, st, rep),
            donate_argnums=(0, 1, 2),
            compiler_options=options,
        )

        def compiled_eval_step(shift: float):
            # replicated logits: in a multi-process run every process gets all of them for the metrics
            return jax.jit(
                functools.partial(eval_step, shift=shift),
                in_shardings=(t, st, f, ot, data),
                out_shardings=rep,
                compiler_options=options,
            )

        self._eval_step = compiled_eval_step(tta_shift)
        run_eval_step = meeting_on_first_call("eval_step", self._eval_step)
        if tta_shift:
            unshifted = compiled_eval_step(0.0)
            self._eval_steps = (self._eval_step, unshifted)
            self._run_eval_step = {
                True: run_eval_step,
                False: meeting_on_first_call("unshifted_eval_step", unshifted),
            }
        else:  # without shifted views to leave out, validation runs the same compiled step
            self._eval_steps = (self._eval_step,)
            self._run_eval_step = {True: run_eval_step, False: run_eval_step}
        self._ema_update = jax.jit(ema_update, out_shardings=(t, st), donate_argnums=(0,))
        self._run_train_step = meeting_on_first_call("train_step", self._train_step)
        self._background: Future | None = None

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def compile_in_background(self, eval_images: jax.ShapeDtypeStruct) -> None:
        """Compile the EMA update and the eval steps, for eval batches shaped like ``eval_images``, on
        another thread while the first train step compiles: XLA compiles each program on one core, so
        on a small CPU the other cores would sit idle. The steps wait for it on their first call."""
        if self.abstract or self._background is not None:
            return

        # taken now: the train step donates these buffers while the thread runs
        names = ("trainable", "stats", "frozen", "other")
        trainable, stats, frozen, other = (
            _with_shardings(getattr(self, n), self.shardings[n]) for n in names
        )
        images = jax.ShapeDtypeStruct(eval_images.shape, eval_images.dtype, sharding=self.batch_sharding)
        ema = (trainable, stats) if self.ema is not None else None  # the EMA is laid out as they are

        def compile_all() -> None:
            if ema is not None:
                self._ema_update.lower(ema, trainable, stats, jax.ShapeDtypeStruct((), jnp.float32)).compile()
            for step in self._eval_steps:
                step.lower(trainable, stats, frozen, other, images).compile()

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-ft-compile")
        self._background = pool.submit(compile_all)
        pool.shutdown(wait=False)

    def _wait_for_background(self) -> None:
        if self._background is not None:
            background, self._background = self._background, None
            background.result()  # its compilations are in jit's cache now; a failure surfaces here

    def train_step(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, step: int) -> dict:
        batch = to_global((images, labels, mask), self.batch_sharding)
        self.trainable, self.opt_state, self.stats, metrics = self._run_train_step(
            self.trainable,
            self.opt_state,
            self.stats,
            self.frozen,
            self.other,
            *batch,
            jnp.int32(step),
            jnp.float32(self.learning_rate(step)),
        )
        self._wait_for_background()
        if self.ema is not None and (self.windows is None or self.windows.closes_window(step)):
            # the decay's warmup counts optimizer updates (the train step itself without accumulation)
            # since this average began: a phase's new one warms up as a new average does
            updates_before = self._updates_at(step) - self._updates_at(self.ema_first_step)
            self.ema = self._ema_update(self.ema, self.trainable, self.stats, jnp.float32(updates_before))
        return metrics

    def _updates_at(self, step: int) -> int:
        return step if self.windows is None else self.windows.update_index(step)

    def step_memory(self, images: tuple[int, ...], labels: tuple[int, ...] = ()) -> dict:
        """Per-device bytes of the compiled train step for a global batch of ``images`` (shape NHWC)
        and labels of per-example shape ``labels``, from XLA's memory analysis (nothing runs)."""

        def abstract(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)

        n = images[0]
        lowered = self._train_step.lower(
            self.trainable, self.opt_state, self.stats, self.frozen, self.other,
            abstract(images, jnp.float32), abstract((n, *labels), jnp.int32), abstract((n,), jnp.float32),
            jnp.int32(0), jnp.float32(0),
        )  # fmt: skip
        m = lowered.compile().memory_analysis()
        used = {
            "arguments": m.argument_size_in_bytes,
            "outputs": m.output_size_in_bytes,
            "temporaries": m.temp_size_in_bytes,
            "aliased": m.alias_size_in_bytes,
        }
        # donated inputs are reused for outputs, so they count once
        used["peak_estimate"] = used["arguments"] + used["outputs"] + used["temporaries"] - used["aliased"]
        return used

    def predict(self, images: np.ndarray, *, shifted: bool = True) -> jax.Array:
        """Logits of the evaluated weights: the EMA where enabled, else the trained ones, averaged
        over the test-time views (without the shifted ones unless ``shifted``)."""
        self._wait_for_background()
        trainable, stats = self.ema if self.ema is not None else (self.trainable, self.stats)
        return self._run_eval_step[shifted](
            trainable, stats, self.frozen, self.other, to_global(images, self.batch_sharding)
        )

    def load_weights(self, model: nnx.Module) -> None:
        """Take ``model``'s parameters and statistics as the trained and the evaluated weights (the
        EMA too), keeping the compiled steps: a fit evaluates its restored best checkpoint on test
        without compiling its eval steps again (a second Trainer did: 10-25 s on two cores)."""
        _, trainable, frozen, stats, _ = nnx.split(model, self._is_trainable, nnx.Param, nnx.BatchStat, ...)
        sh = self.shardings
        self.trainable = to_global(trainable, sh["trainable"], owned=True)
        self.frozen, self.stats = to_global(frozen, sh["frozen"]), to_global(stats, sh["stats"], owned=True)
        if self.ema is not None:
            self.ema = jax.tree.map(jnp.copy, (self.trainable, self.stats))

    def write_back(self, model: nnx.Module, *, evaluated: bool = False) -> None:
        """Copy the trained state into ``model`` (e.g. to save or embed with it); ``evaluated``
        copies the weights ``predict`` uses instead (the EMA, where enabled)."""
        trainable, stats = self.ema if evaluated and self.ema is not None else (self.trainable, self.stats)
        # copies: the next step donates the trainer's own buffers, and the model must outlive them
        nnx.update(model, *jax.tree.map(jnp.copy, (trainable, stats)), self.frozen)
