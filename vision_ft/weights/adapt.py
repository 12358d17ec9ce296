"""timm's loading semantics for checkpoints that differ from the model: input channels, classes."""

from __future__ import annotations

import math

import numpy as np


def adapt_input_conv(in_chans: int, weight: np.ndarray) -> np.ndarray:
    """Adapt an OIHW first-conv kernel trained on RGB to ``in_chans`` inputs, as timm does.

    One channel sums the RGB filters (a grey image seen as three equal channels); other counts
    repeat the RGB filters cyclically and rescale by ``3 / in_chans`` so activations keep their
    magnitude.
    """
    dtype = weight.dtype
    w = weight.astype(np.float32)
    out_ch, cur_in, kh, kw = w.shape
    if in_chans == cur_in:
        return weight
    if in_chans == 1:
        if cur_in > 3:
            # space-to-depth stems interleave RGB within each group of three inputs
            if cur_in % 3:
                raise ValueError(f"cannot adapt a {cur_in}-channel stem to 1 channel")
            w = w.reshape(out_ch, cur_in // 3, 3, kh, kw).sum(axis=2)
        else:
            w = w.sum(axis=1, keepdims=True)
    else:
        if cur_in != 3:
            raise ValueError(f"cannot adapt a {cur_in}-channel stem to {in_chans} channels")
        repeat = math.ceil(in_chans / 3)
        w = np.tile(w, (1, repeat, 1, 1))[:, :in_chans] * (3 / in_chans)
    return w.astype(dtype)


def adapt_norm_stats(in_chans: int, values: tuple[float, ...]) -> tuple[float, ...]:
    """Per-channel mean/std matching :func:`adapt_input_conv`'s channel layout."""
    if in_chans == len(values):
        return tuple(values)
    if in_chans == 1:
        return (float(np.mean(values)),)
    return tuple(values[i % len(values)] for i in range(in_chans))
