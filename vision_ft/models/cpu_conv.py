"""Convolutions for XLA's CPU backend, written as the shifted views and matmuls they are.

XLA's CPU convolution (Eigen's, as compiled by train/step.py) is fast forward and backward for
dense kernels, but slow for grouped (depthwise) convolutions and for outputs smaller than the
kernel. Each function here computes exactly the convolution ``lax.conv_general_dilated`` would
(NHWC input, HWIO kernel, explicit ``((top, bottom), (left, right))`` padding), with gradients
chosen for speed on CPU. Every path is tested against XLA's convolution and its gradients
(tests/test_layers.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Strides = tuple[int, int]
Pads = tuple[tuple[int, int], tuple[int, int]]


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _shifted_views(x: jax.Array, kh: int, kw: int, strides: Strides, pads: Pads) -> list[jax.Array]:
    """The kh*kw strided views of the padded input that each kernel tap multiplies, tap-major."""
    (sh, sw), (ph, pw) = strides, pads
    out_h, out_w = output_size(x.shape[1], kh, sh, ph), output_size(x.shape[2], kw, sw, pw)
    padded = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    return [
        padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]


def patch_matmul(x: jax.Array, kernel: jax.Array, strides: Strides, pads: Pads) -> jax.Array:
    """A (groups=1) convolution as one matmul over the kh*kw shifted views of the padded input."""
    kh, kw, cin, cout = kernel.shape
    patches = jnp.concatenate(_shifted_views(x, kh, kw, strides, pads), axis=-1)
    return patches @ kernel.reshape(kh * kw * cin, cout)


def weight_grad(inputs: jax.Array, grad: jax.Array) -> jax.Array:
    """``inputs^T @ grad`` summed over every leading (batch and spatial) axis: a matmul's kernel
    gradient. The barrier keeps both operands as they were computed, so the dot reads ``inputs``
    transposed in place; without it XLA gave a producer (a BatchNorm or ReLU backward) a transposed
    output layout, and that fused elementwise-plus-transpose ran at under 1 GB/s."""
    rows, cols = inputs.shape[-1], grad.shape[-1]
    a, b = jax.lax.optimization_barrier((inputs.reshape(-1, rows), grad.reshape(-1, cols)))
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _summed_in_float32(terms) -> jax.Array:
    """The sum of ``terms`` (a depthwise convolution's taps), accumulated in at least float32 and
    returned in their dtype, as XLA's bf16 convolutions accumulate: summed in bf16, each tap rounds
    the running sum again (a 7x7 kernel erred 4.6x as much). A no-op for float32."""
    total, dtype = None, None
    for term in terms:
        dtype = term.dtype
        wide = term.astype(jnp.promote_types(dtype, jnp.float32))
        total = wide if total is None else total + wide
    return total.astype(dtype)


def _depthwise_forward(x: jax.Array, kernel: jax.Array, strides: Strides, pads: Pads) -> jax.Array:
    kh, kw = kernel.shape[:2]
    views = _shifted_views(x, kh, kw, strides, pads)
    return _summed_in_float32(view * kernel[t // kw, t % kw, 0] for t, view in enumerate(views))


def _depthwise_input_grad(grad: jax.Array, kernel: jax.Array, in_shape, strides: Strides, pads: Pads):
    """The transposed depthwise convolution: the output gradient spread back onto the stride grid
    (zeros between), padded by kernel - 1, and correlated with the flipped kernel, one fused sum."""
    kh, kw = kernel.shape[:2]
    (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
    _, h, w, _ = in_shape
    out_h, out_w = grad.shape[1:3]
    spread = jax.lax.pad(
        grad,
        jnp.zeros((), grad.dtype),
        (
            (0, 0, 0),
            (kh - 1, h + pt + pb - (out_h - 1) * sh - 1, sh - 1),
            (kw - 1, w + pl + pr - (out_w - 1) * sw - 1, sw - 1),
            (0, 0, 0),
        ),
    )

    def tap(i: int, j: int) -> jax.Array:
        top, left = pt + kh - 1 - i, pl + kw - 1 - j
        return spread[:, top : top + h, left : left + w, :] * kernel[i, j, 0]

    return _summed_in_float32(tap(i, j) for i in range(kh) for j in range(kw))


def _depthwise_kernel_grad(x: jax.Array, grad: jax.Array, kernel_shape, strides: Strides, pads: Pads):
    """Per tap and channel, sum(view * grad) over batch and space. The sum over output rows is
    spelled out as adds of row slabs so that XLA emits every tap's products as one fused
    elementwise loop; as plain reductions XLA's CPU backend materialised each view first and ran
    3-8x slower. Rows, not images: slicing single images out of a batch sharded over devices
    made XLA exchange slabs between them (300x slower on 8 devices)."""
    kh, kw = kernel_shape[:2]
    views = _shifted_views(x, kh, kw, strides, pads)
    rows = range(grad.shape[1])
    # accumulated in at least float32, as the forward pass (bf16 row sums erred 4x XLA's gradient)
    wide = jnp.promote_types(grad.dtype, jnp.float32)
    per_tap = jnp.stack([sum((view[:, r] * grad[:, r]).astype(wide) for r in rows) for view in views])
    return per_tap.sum(axis=(1, 2)).astype(jnp.result_type(x, grad)).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Strides, pads: Pads) -> jax.Array:
    """A depthwise convolution (kernel ``(kh, kw, 1, C)``) as kh*kw shifted multiply-adds. XLA's
    grouped convolution ran 10-50x slower forward on CPU; autodiff of the multiply-adds kept every
    shifted view alive for the backward pass, which cost more than the rest of the layer."""
    return _depthwise_forward(x, kernel, strides, pads)


def _depthwise_conv_fwd(x, kernel, strides, pads):
    return _depthwise_forward(x, kernel, strides, pads), (x, kernel)


def _depthwise_conv_bwd(strides, pads, residuals, grad):
    x, kernel = residuals
    return (
        _depthwise_input_grad(grad, kernel, x.shape, strides, pads),
        _depthwise_kernel_grad(x, grad, kernel.shape, strides, pads),
    )


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


@jax.custom_vjp
def pointwise_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over the channel axis (an unpadded 1x1 convolution)."""
    return x @ kernel


def _pointwise_matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _pointwise_matmul_bwd(residuals, grad):
    x, kernel = residuals
    return grad @ kernel.T, weight_grad(x, grad)


pointwise_matmul.defvjp(_pointwise_matmul_fwd, _pointwise_matmul_bwd)
