"""Training-mode BatchNorm with a hand-written VJP: the fewest passes over the activations.

Autodiff of the two-pass BatchNorm (mean, then the mean squared deviation, then the affine
normalisation) gives XLA a backward pass of several separate reductions and elementwise sweeps
over each activation. Written out, the backward pass is two sums per channel (of the output
gradient and of it times the normalised input) and one elementwise sweep. The statistics are
PyTorch's: biased variance for normalising, computed in at least float32.

Per-example ``weights`` (1 or 0) leave examples out of the statistics: the blanks that stand in for
unreadable images in a train batch, which the loss already ignores. Their outputs are 0, so that a
blank, normalised by statistics it has no part in, cannot grow layer after layer into inf (and inf
times a weight of 0 into NaN statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _per_example(weights: jax.Array, x: jax.Array) -> jax.Array:
    return weights.reshape(-1, *(1,) * (x.ndim - 1)).astype(x.dtype)


def counted_elements(x: jax.Array, weights: jax.Array | None) -> jax.Array | int:
    """How many values per channel the statistics average: those of the weighted examples."""
    per_example = x.size // (x.shape[0] * x.shape[-1])
    if weights is None:
        return x.size // x.shape[-1]
    return jnp.sum(weights.astype(jnp.float32)) * per_example


def _stats(x: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(x.ndim - 1))
    if weights is None:
        mean = jnp.mean(x, axis=axes)
        return mean, jnp.mean(jnp.square(x - mean), axis=axes)
    counted, n = _per_example(weights, x) > 0, jnp.maximum(counted_elements(x, weights), 1).astype(x.dtype)
    mean = jnp.sum(jnp.where(counted, x, 0), axis=axes) / n
    return mean, jnp.sum(jnp.where(counted, jnp.square(x - mean), 0), axis=axes) / n


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, batch mean, biased batch variance)`` over every axis but the last (channels), the
    statistics over the examples of weight 1 where ``weights`` (shape ``(batch,)``) is given, and
    ``y`` 0 for the others."""
    return _forward(x, scale, bias, epsilon, weights)[0]


def _forward(x, scale, bias, epsilon, weights):
    if weights is not None:
        # a batch of blanks only: normalise with the whole batch's statistics rather than with
        # none (the variance 0, scaling by rsqrt(eps) layer after layer until the values overflow);
        # nothing learns from it, as the loss weighs every example 0
        weights = jnp.where(jnp.sum(weights) > 0, weights, jnp.ones_like(weights))
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, var = _stats(x32, weights)
    inv = jax.lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (inv * scale) + bias
    if weights is not None:
        y = jnp.where(_per_example(weights, y) > 0, y, 0)
    return (y.astype(x.dtype), mean, var), (x, mean, inv, scale, weights)


def _batch_norm_fwd(x, scale, bias, epsilon, weights):
    return _forward(x, scale, bias, epsilon, weights)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale, weights = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    centred = x.astype(mean.dtype) - mean
    dy = dy.astype(mean.dtype)
    if weights is not None:  # a blank's output is 0 whatever its input: it passes no gradient
        counted = _per_example(weights, centred) > 0
        centred, dy = jnp.where(counted, centred, 0), jnp.where(counted, dy, 0)
    dbias = jnp.sum(dy, axis=axes)
    dscale = jnp.sum(dy * centred, axis=axes) * inv
    # d/dx of (x - mean) * inv through mean and var, plus the statistics' own cotangents
    if weights is None:
        n = float(x.size // x.shape[-1])  # a Python int past 2**31 cannot enter the traced program
        dx = (scale * inv) * (dy - dbias / n - centred * (inv * dscale / n)) + (
            dmean + 2 * dvar * centred
        ) / n
    else:  # only the weighted examples move the statistics, each by its weight / n
        share = _per_example(weights, centred) / jnp.maximum(counted_elements(x, weights), 1)
        dx = (scale * inv) * (dy - share * (dbias + centred * (inv * dscale)))
        dx = dx + share * (dmean + 2 * dvar * centred)
    dweights = None if weights is None else jnp.zeros_like(weights)
    return dx.astype(x.dtype), dscale, dbias, dweights


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
