"""Training-mode BatchNorm with a hand-written VJP: the fewest passes over the activations.

Autodiff of the two-pass BatchNorm (mean, then the mean squared deviation, then the affine
normalisation) gives XLA a backward pass of several separate reductions and elementwise sweeps
over each activation. Written out, the backward pass is two sums per channel (of the output
gradient and of it times the normalised input) and one elementwise sweep. The statistics are
PyTorch's: biased variance for normalising, computed in at least float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, batch mean, biased batch variance)`` over every axis but the last (channels)."""
    return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var = _stats(x32)
    inv = jax.lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (inv * scale) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_fwd(x, scale, bias, epsilon):
    return _forward(x, scale, bias, epsilon)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    centred = x.astype(mean.dtype) - mean
    dy = dy.astype(mean.dtype)
    dbias = jnp.sum(dy, axis=axes)
    dscale = jnp.sum(dy * centred, axis=axes) * inv
    # d/dx of (x - mean) * inv through mean and var, plus the statistics' own cotangents
    dx = (scale * inv) * (dy - dbias / n - centred * (inv * dscale / n)) + (dmean + 2 * dvar * centred) / n
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
