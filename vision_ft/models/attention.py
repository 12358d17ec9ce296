"""Multi-head self-attention from a fused ``qkv`` projection, with a hand-written VJP.

The backward pass is the one FlashAttention derives (without tiling, which sequences of a few
hundred tokens do not need): the softmax gradient takes its row sums from ``dout * out``
(``N x D``) instead of ``dp * p`` (``N x N``), and the query, key and value gradients come back
stacked in the ``qkv`` projection's layout instead of being scattered into it one by one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _split_heads(qkv: jax.Array, num_heads: int) -> jax.Array:
    """``(B, N, 3 * C)`` -> ``(3, B, heads, N, head_dim)``: heads in front, so that every product
    is a plain batched matmul (with heads inside the token axis XLA's CPU backend chose
    transposed layouts for them and ran attention 1.2-2x slower)."""
    b, n, three_c = qkv.shape
    return qkv.reshape(b, n, 3, num_heads, three_c // (3 * num_heads)).transpose(2, 0, 3, 1, 4)


def _merge_heads(x: jax.Array) -> jax.Array:
    """``(B, heads, N, head_dim)`` -> ``(B, N, heads * head_dim)``."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _forward(qkv, num_heads, scale):
    q, k, v = _split_heads(qkv, num_heads)
    logits = (q * scale) @ k.swapaxes(-1, -2)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = probs @ v
    return out, (q, k, v, probs, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def self_attention(qkv: jax.Array, num_heads: int, scale: float) -> jax.Array:
    """``softmax(q k^T * scale) v`` per head from ``qkv`` ``(B, N, 3 * C)``; returns ``(B, N, C)``."""
    return _merge_heads(_forward(qkv, num_heads, scale)[0])


def _self_attention_fwd(qkv, num_heads, scale):
    out, residuals = _forward(qkv, num_heads, scale)
    return _merge_heads(out), residuals


def _self_attention_bwd(num_heads, scale, residuals, grad):
    q, k, v, probs, out = residuals
    b, n, c = grad.shape
    dout = grad.reshape(b, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)
    dv = probs.swapaxes(-1, -2) @ dout
    dprobs = dout @ v.swapaxes(-1, -2)
    row = jnp.sum(dout.astype(jnp.float32) * out, axis=-1, keepdims=True)
    dlogits = (probs * (dprobs - row)).astype(q.dtype)
    dq = (dlogits @ k) * scale
    dk = (dlogits.swapaxes(-1, -2) @ q) * scale
    # (3, B, heads, N, head_dim) -> (B, N, 3, heads, head_dim): the qkv projection's layout
    return (jnp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b, n, 3 * c),)


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)
