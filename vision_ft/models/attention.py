"""Multi-head self-attention from a fused ``qkv`` projection, with a hand-written VJP.

The backward pass is the one FlashAttention derives (without tiling, which sequences of a few
hundred tokens do not need): the softmax gradient takes its row sums from ``dout * out``
(``N x D``) instead of ``dp * p`` (``N x N``), and the query, key and value gradients come back
stacked in the ``qkv`` projection's layout instead of being scattered into it one by one.

On a single CPU device inference attends the batch a few images at a time (``lax.map`` over chunks
of the batch). XLA's CPU backend ran the batched products of one or two images' heads faster than
those of a whole batch on a 2-core AMD EPYC: ViT-S/16 at 224 px, batch 64, forward, one layer's
attention took 68 ms in chunks of 2 images against 95 ms whole (81 ms in chunks of 1, 102 ms in
chunks of 4; best of 8 alternated rounds), and embedding ran at 11.90 against 11.39 img/s. On a
2-core Intel Xeon (AVX-512) embedding ran alike either way (22.55 against 22.64 img/s, batch 64).
Training attends the whole batch: the chunks' slices and stitched outputs cost more than they
saved there. ViT-S's train step (batch 32) took 4.08 s whole against 4.27 s in chunks on the
Intel VM (4.16 s with only the backward chunked; best of 4 alternated rounds); on the AMD one it
ran alike either way (4.10 img/s in chunks against 4.08 whole).
Chunks stay contiguous in the batch, which a batch sharded over several devices would not allow
without gathering it; there the batch is attended whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CPU_IMAGES_PER_CHUNK = 2


def _split_heads(qkv: jax.Array, num_heads: int) -> jax.Array:
    """``(B, N, 3 * C)`` -> ``(3, B, heads, N, head_dim)``: heads in front, so that every product
    is a plain batched matmul (with heads inside the token axis XLA's CPU backend chose
    transposed layouts for them and ran attention 1.2-2x slower)."""
    b, n, three_c = qkv.shape
    return qkv.reshape(b, n, 3, num_heads, three_c // (3 * num_heads)).transpose(2, 0, 3, 1, 4)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``(B, N, heads * head_dim)`` -> ``(B, heads, N, head_dim)``."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: jax.Array) -> jax.Array:
    """``(B, heads, N, head_dim)`` -> ``(B, N, heads * head_dim)``."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _attend(qkv: jax.Array, num_heads: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """(output ``(B, N, C)``, attention probabilities ``(B, heads, N, N)``)."""
    q, k, v = _split_heads(qkv, num_heads)
    logits = (q * scale) @ k.swapaxes(-1, -2)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return _merge_heads(probs @ v), probs


def _attend_grad(qkv, probs, out, grad, num_heads: int, scale: float) -> jax.Array:
    q, k, v = _split_heads(qkv, num_heads)
    dout, out = _heads(grad, num_heads), _heads(out, num_heads)
    dv = probs.swapaxes(-1, -2) @ dout
    dprobs = dout @ v.swapaxes(-1, -2)
    row = jnp.sum(dout.astype(jnp.float32) * out, axis=-1, keepdims=True)
    dlogits = (probs * (dprobs - row)).astype(q.dtype)
    dq = (dlogits @ k) * scale
    dk = (dlogits.swapaxes(-1, -2) @ q) * scale
    b, n, c = grad.shape
    # (3, B, heads, N, head_dim) -> (B, N, 3, heads, head_dim): the qkv projection's layout
    return jnp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b, n, 3 * c)


def _by_chunks(fn, images: int, *batched: jax.Array):
    """``fn`` over consecutive chunks of ``images`` examples of every array, outputs concatenated
    back along the batch (a reshape: no copy)."""
    batch = batched[0].shape[0]
    if images >= batch:
        return fn(*batched)
    chunked = [x.reshape(batch // images, images, *x.shape[1:]) for x in batched]
    out = jax.lax.map(lambda xs: fn(*xs), chunked)
    return jax.tree.map(lambda y: y.reshape(batch, *y.shape[2:]), out)


def images_per_chunk(batch: int) -> int:
    """How many images attention takes at a time: the whole batch except on one CPU device."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return batch
    return CPU_IMAGES_PER_CHUNK if batch % CPU_IMAGES_PER_CHUNK == 0 else 1


def self_attention(qkv: jax.Array, num_heads: int, scale: float, chunk: int | None = None) -> jax.Array:
    """``softmax(q k^T * scale) v`` per head from ``qkv`` ``(B, N, 3 * C)``; returns ``(B, N, C)``.
    Outside differentiation ``chunk`` images are attended at a time (default: ``images_per_chunk``);
    ``B`` must be a multiple of it. Differentiated, the whole batch is attended at once."""
    chunk = images_per_chunk(qkv.shape[0]) if chunk is None else chunk
    if qkv.shape[0] % chunk:
        raise ValueError(f"batch {qkv.shape[0]} is not a multiple of the attention chunk {chunk}")
    return _self_attention(qkv, num_heads, scale, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _self_attention(qkv, num_heads, scale, chunk):
    return _by_chunks(lambda x: _attend(x, num_heads, scale)[0], chunk, qkv)


def _self_attention_fwd(qkv, num_heads, scale, chunk):
    out, probs = _attend(qkv, num_heads, scale)
    return out, (qkv, probs, out)


def _self_attention_bwd(num_heads, scale, chunk, residuals, grad):
    return (_attend_grad(*residuals, grad, num_heads=num_heads, scale=scale),)


_self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)
