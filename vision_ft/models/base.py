"""The interface every backbone shares: timm's forward_features / forward_head split."""

from __future__ import annotations

import jax
from flax import nnx

from vision_ft.models.registry import PretrainedCfg


class Backbone(nnx.Module):
    """Inputs are float NHWC, normalized with ``pretrained_cfg.mean``/``std``: the values timm's
    model sees, transposed. ``train=True`` uses batch statistics and stochastic depth/dropout."""

    pretrained_cfg: PretrainedCfg
    num_classes: int
    num_features: int
    # An input side that is not a multiple of this loses its last rows or columns, as in timm: a
    # ViT's patches and ConvNeXt's unpadded strided convolutions leave the remainder out
    input_multiple: int = 1

    def forward_features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        raise NotImplementedError

    def forward_head(self, x: jax.Array, pre_logits: bool = False, *, train: bool = False) -> jax.Array:
        raise NotImplementedError

    def forward_intermediates(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """The output of every stage (CNNs) or block (ViTs); the last feeds forward_features' end."""
        raise NotImplementedError

    def pool_intermediate(self, features: jax.Array) -> jax.Array:
        """An intermediate output pooled to one vector per image: the spatial mean of NHWC maps."""
        return features.mean(axis=(1, 2))

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        raise NotImplementedError

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.forward_head(self.forward_features(x, train=train), train=train)
