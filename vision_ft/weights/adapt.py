"""timm's loading semantics for checkpoints that differ from the model: input channels, classes."""

from __future__ import annotations

import math

import numpy as np

from vision_ft.weights.mapping import WeightLoadError


def adapt_input_conv(
    in_chans: int, weight: np.ndarray, *, name: str = "first conv weight", source: str = "checkpoint"
) -> np.ndarray:
    """Adapt an OIHW first-conv kernel trained on RGB to ``in_chans`` inputs, as timm does.

    One channel sums the RGB filters (a grey image seen as three equal channels); other counts
    repeat the RGB filters cyclically and rescale by ``3 / in_chans`` so activations keep their
    magnitude. ``name`` (the state-dict key) and ``source`` (where the weights came from) only
    make the :class:`WeightLoadError` raised for a kernel that cannot be adapted say which one.
    """
    if weight.ndim != 4:
        raise WeightLoadError(
            f"{source}: {name} has shape {tuple(weight.shape)}; expected a 4-D (out, in, h, w) conv kernel"
        )
    out_ch, cur_in, kh, kw = weight.shape
    if in_chans == cur_in:
        return weight
    cannot_adapt = (
        f"{source}: {name} has shape {tuple(weight.shape)}, a {cur_in}-channel stem, "
        f"which cannot be adapted to the model's {in_chans} input channels"
    )
    dtype = weight.dtype
    w = weight.astype(np.float32)
    if in_chans == 1:
        if cur_in > 3:
            # space-to-depth stems interleave RGB within each group of three inputs
            if cur_in % 3:
                raise WeightLoadError(f"{cannot_adapt} (its channels are not groups of RGB)")
            w = w.reshape(out_ch, cur_in // 3, 3, kh, kw).sum(axis=2)
        else:
            w = w.sum(axis=1, keepdims=True)
    else:
        if cur_in != 3:
            raise WeightLoadError(f"{cannot_adapt} (only RGB stems can be widened or narrowed)")
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
