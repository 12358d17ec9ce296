"""Building blocks shared by several architecture families, with PyTorch/timm numerics."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from vision_ft.models.cpu_conv import (
    depthwise_conv,
    output_size,
    patch_matmul,
    pointwise_matmul,
)
from vision_ft.models.fused_norm import batch_norm_train, counted_elements

# PyTorch's BatchNorm momentum 0.1 weights the new batch; Flax's 0.9 weights the running value.
BN_MOMENTUM = 0.9


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's nn.GELU, ``x / 2 * (1 + erf(x / sqrt(2)))``, the exact form (jax.nn.gelu defaults
    to the tanh approximation). Written out rather than jax.nn.gelu(approximate=False), whose erfc
    XLA's CPU backend expands into a slower branchy series (the MLP's GELU cost 3x more)."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def torch_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[tuple[int, int], ...]:
    """timm's symmetric padding ``((stride - 1) + dilation * (k - 1)) // 2`` on both spatial axes."""
    pad = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    return ((pad, pad), (pad, pad))


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv(nnx.Conv):
    """nnx.Conv with CPU paths that compute the same convolution faster.

    XLA's CPU backend runs grouped (depthwise) convolutions and convolutions whose output is
    smaller than the kernel (e.g. 3x3 on a 2x2 map) through slow generic code: 7-35x slower forward
    plus backward than the shifted multiply-adds or patch matmul of models/cpu_conv.py. Unpadded
    1x1 convolutions are a (strided) matmul with an in-place transposed kernel gradient. Other
    convolutions, and every convolution on other backends, are XLA's.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        in_chs, out_chs = self.in_features, self.out_features
        depthwise = self.feature_group_count == in_chs == out_chs and in_chs > 1
        dilated = any(d != 1 for d in _pair(self.kernel_dilation))
        if jax.default_backend() != "cpu" or dilated or isinstance(self.padding, int):
            return super().__call__(x)
        sh, sw = _pair(self.strides)
        pads = self._explicit_padding(x.shape[1], x.shape[2], kh, kw, sh, sw)
        out_h, out_w = output_size(x.shape[1], kh, sh, pads[0]), output_size(x.shape[2], kw, sw, pads[1])
        dense = self.feature_group_count == 1
        if kh == kw == 1 and dense and pads == ((0, 0), (0, 0)):
            path = "pointwise"
        elif depthwise:
            path = "depthwise"
        # patch-embedding-sized kernels would need hundreds of slices: leave those to XLA
        elif dense and out_h < kh and out_w < kw and kh * kw <= 49:
            path = "patches"
        else:
            return super().__call__(x)
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        x = x.astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        if path == "pointwise":
            y = pointwise_matmul(x[:, ::sh, ::sw], kernel[0, 0])
        elif path == "depthwise":
            y = depthwise_conv(x, kernel, (sh, sw), pads)
        else:
            y = patch_matmul(x, kernel, (sh, sw), pads)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    def _explicit_padding(self, h: int, w: int, kh: int, kw: int, sh: int, sw: int):
        if self.padding == "SAME":
            return _same_pads(h, kh, sh), _same_pads(w, kw, sw)
        if self.padding == "VALID":
            return (0, 0), (0, 0)
        return tuple(tuple(p) for p in self.padding)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d(
    in_chs: int,
    out_chs: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    bias: bool = False,
    padding: str | tuple = "torch",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A 2-D convolution in NHWC. ``padding="torch"`` is timm's symmetric padding; ``"SAME"`` is
    TensorFlow's (extra row/column at the bottom/right), which tf_* ports need."""
    if padding == "torch":
        padding = torch_padding(kernel_size, stride, dilation)
    return Conv(
        in_chs,
        out_chs,
        (kernel_size, kernel_size),
        strides=stride,
        padding=padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Linear(nnx.Linear):
    """nnx.Linear whose kernel gradient on CPU reads the input transposed in place
    (cpu_conv.weight_grad) instead of letting XLA transpose a fused producer's output."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if jax.default_backend() != "cpu":
            return super().__call__(x)
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        y = pointwise_matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        return y + self.bias[...].astype(dtype) if self.bias is not None else y


# per-example weights (1 or 0) of the batch being traced: see batch_statistics_over
_STATISTICS_WEIGHTS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "vision_ft_batch_statistics_weights", default=None
)


@contextlib.contextmanager
def batch_statistics_over(weights: jax.Array) -> Iterator[None]:
    """Within the block, every training-mode ``BatchNorm`` takes its batch statistics over the
    examples of weight 1 (shape ``(batch,)``): the train step leaves the blanks that stand in for
    unreadable images out, which the loss already ignores, without threading a mask through every
    block of every architecture."""
    token = _STATISTICS_WEIGHTS.set(weights)
    try:
        yield
    finally:
        _STATISTICS_WEIGHTS.reset(token)


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm that a fine-tune can freeze: with ``frozen_stats`` set it always normalizes
    with its running statistics and never updates them, like a frozen timm layer kept in eval mode,
    whatever ``train`` the model is called with. In training mode its batch statistics leave out
    the examples ``batch_statistics_over`` weighs 0."""

    frozen_stats: bool = False

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if self.frozen_stats:
            use_running_average = True
        resolved = self.use_running_average if use_running_average is None else use_running_average
        if resolved or mask is not None:
            return super().__call__(x, use_running_average=use_running_average, mask=mask)
        x = x.astype(self.dtype or jnp.result_type(x, self.scale[...]))
        weights = _STATISTICS_WEIGHTS.get()
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, weights)
        # PyTorch's running variance averages the unbiased batch variance, n / (n - 1) times the
        # biased one that normalises
        n = counted_elements(x, weights)
        unbiased = n / max(n - 1, 1) if weights is None else n / jnp.maximum(n - 1, 1)
        mean, var = jax.lax.stop_gradient((mean, var * unbiased))
        # a batch of blanks only (every image unreadable), or one value per channel (one usable
        # image at 1 x 1, which PyTorch refuses), leaves the running statistics as they were
        momentum = self.momentum if weights is None else jnp.where(n > 1, self.momentum, 1.0)
        # set_value, not `[...] =`: as in next_key (0.9 s of the default fit's train-step trace)
        self.mean.set_value(momentum * self.mean[...] + (1 - momentum) * mean)
        self.var.set_value(momentum * self.var[...] + (1 - momentum) * var)
        return y


def batch_norm(
    num_features: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> BatchNorm:
    return BatchNorm(
        num_features,
        momentum=BN_MOMENTUM,
        epsilon=eps,
        use_fast_variance=False,  # two-pass variance, closer to PyTorch's than E[x^2] - E[x]^2
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def next_key(stream: nnx.RngStream) -> jax.Array:
    """``stream()``: the same key, and the same count afterwards. Its counter is stored with
    ``set_value`` where flax's own call stores it by index, which under ``jit`` asks a tracer for
    its sharding, and jax answers by walking the whole jaxpr traced so far (0.4 s of the default
    fit's train-step trace, for its drop-path layers)."""
    count = stream.count[...]
    key = jax.random.fold_in(stream.key[...], count)
    stream.count.set_value(count + 1)
    return key


class DropPath(nnx.Module):
    """Stochastic depth: drop a whole residual branch per sample, scaling survivors by 1/keep."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.rngs = rngs["dropout"].fork() if rate > 0 else None

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(next_key(self.rngs), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


def linear_head(
    in_features: int, num_classes: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
) -> nnx.Module | None:
    """A classifier layer, or ``None`` for ``num_classes=0`` (features only, as timm's Identity)."""
    if num_classes <= 0:
        return None
    return Linear(in_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
