"""Vision Transformer (Dosovitskiy et al. 2020) and DINOv2 (Oquab et al. 2023) with timm's module
names and math.

Tokens are ``(B, N, D)``: an optional class token, optional register tokens, then the patch grid
in row-major order. Classic ViTs hold a position embedding for the class token too; DINOv2 with
registers (``no_embed_class``) only for patches, so prefix tokens there are added after the
embedding. When a checkpoint's patch grid differs from the model's, :func:`checkpoint_filter`
resamples the position embedding as timm's ``checkpoint_filter_fn`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vision_ft.models.attention import self_attention
from vision_ft.models.base import Backbone
from vision_ft.models.layers import DropPath, Linear, conv2d, gelu, linear_head
from vision_ft.models.registry import ModelEntry, PretrainedCfg, StateDict, register_model
from vision_ft.weights.mapping import conv, layernorm, linear, param

LN_EPS = 1e-6  # timm.layers.LayerNorm's default, not PyTorch's 1e-5


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224  # the checkpoint's training resolution (its pos_embed grid)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale (DINOv2: 1e-5); None disables it
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embeddings for patches only (prefix tokens get none)
    global_pool: str = "token"  # "token", "avg", "max", "avgmax" or "" (no pooling)
    fc_norm: bool | None = None  # None: norm after pooling iff global_pool averages/maxes


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}

CONFIGS: dict[str, ViTConfig] = {}
for _size in ("tiny", "small", "base", "large"):
    for _res in (224, 384):
        CONFIGS[f"vit_{_size}_patch16_{_res}"] = ViTConfig(16, img_size=_res, **_SIZES[_size])
        if _size != "tiny":
            CONFIGS[f"vit_{_size}_patch32_{_res}"] = ViTConfig(32, img_size=_res, **_SIZES[_size])
for _size in ("small", "base", "large"):
    CONFIGS[f"vit_{_size}_patch14_dinov2"] = ViTConfig(14, img_size=518, init_values=1e-5, **_SIZES[_size])
    CONFIGS[f"vit_{_size}_patch14_reg4_dinov2"] = ViTConfig(
        14, img_size=518, init_values=1e-5, reg_tokens=4, no_embed_class=True, **_SIZES[_size]
    )


def _to_2tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def layer_norm(dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def dense(in_features: int, out_features: int, *, bias: bool = True, rngs: nnx.Rngs, **kw) -> Linear:
    """nn.Linear with timm's ViT init: normal with std 0.02 (timm's ``trunc_normal_`` bounds are
    absolute, +-2, i.e. 100 std: nothing is truncated), zero bias."""
    init = nnx.initializers.normal(0.02)
    return Linear(in_features, out_features, use_bias=bias, kernel_init=init, rngs=rngs, **kw)


class PatchEmbed(nnx.Module):
    """Non-overlapping ``patch x patch`` convolution, flattened to ``(B, H/p * W/p, D)``."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, *, rngs, **kw):
        self.img_size = _to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = conv2d(
            in_chans, embed_dim, patch_size, stride=patch_size, padding="VALID", bias=True, rngs=rngs, **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if tuple(x.shape[1:3]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[1:3])} does not match the model's {self.img_size}")
        # The stride-p, VALID p x p convolution computed as what it is: one matmul over flattened
        # (row, column, channel) patches, the order of the HWIO kernel's leading axes. Cheaper than
        # a convolution with a kernel the size of its stride on CPU, and the same numbers.
        b, _, _, c = x.shape
        (gh, gw), p = self.grid_size, self.patch_size
        dtype = self.proj.dtype or jnp.result_type(x, self.proj.kernel[...])
        x = x[:, : gh * p, : gw * p].astype(dtype).reshape(b, gh, p, gw, p, c)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        y = x @ self.proj.kernel[...].astype(dtype).reshape(p * p * c, -1)
        return y + self.proj.bias[...].astype(dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused ``qkv`` projection laid out as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, rngs, **kw):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = dense(dim, dim * 3, bias=qkv_bias, rngs=rngs, **kw)
        self.proj = dense(dim, dim, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self_attention(self.qkv(x), self.num_heads, self.scale))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs, **kw):
        self.fc1 = dense(dim, hidden, rngs=rngs, **kw)
        self.fc2 = dense(hidden, dim, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_values: float, *, param_dtype=jnp.float32, **_unused):
        self.gamma = nnx.Param(jnp.full((dim,), init_values, dtype=param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, config: ViTConfig, drop_path: float, *, rngs, **kw):
        dim = config.embed_dim
        self.norm1 = layer_norm(dim, rngs=rngs, **kw)
        self.attn = Attention(dim, config.num_heads, config.qkv_bias, rngs=rngs, **kw)
        self.ls1 = nnx.data(LayerScale(dim, config.init_values, **kw) if config.init_values else None)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, rngs=rngs, **kw)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), rngs=rngs, **kw)
        self.ls2 = nnx.data(LayerScale(dim, config.init_values, **kw) if config.init_values else None)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.attn(self.norm1(x))
        if self.ls1 is not None:
            y = self.ls1(y)
        x = x + self.drop_path1(y, train=train)
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = self.ls2(y)
        return x + self.drop_path2(y, train=train)


def _tokens(key: jax.Array, n: int, dim: int, std: float, param_dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(key, (1, n, dim), param_dtype))


class VisionTransformer(Backbone):
    def __init__(
        self,
        config: ViTConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int | tuple[int, int] | None = None,
        drop_path_rate: float = 0.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        **_unused,
    ):
        if config.global_pool not in ("", "token", "avg", "max", "avgmax"):
            raise ValueError(f"unsupported global_pool {config.global_pool!r}")
        if config.global_pool == "token" and not config.class_token:
            raise ValueError("token pooling needs the class token")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self._head_kw = kw
        self.config = config
        dim = config.embed_dim
        self.global_pool = config.global_pool
        self.num_prefix_tokens = int(config.class_token) + config.reg_tokens
        self.no_embed_class = config.no_embed_class
        self.patch_embed = PatchEmbed(
            img_size or config.img_size, config.patch_size, in_chans, dim, rngs=rngs, **kw
        )
        self.img_size, self.grid_size = self.patch_embed.img_size, self.patch_embed.grid_size
        self.input_multiple = config.patch_size
        key = rngs.params()
        k_cls, k_reg, k_pos = jax.random.split(key, 3)
        # nnx.data: attributes that may be None stay data, so they can be replaced later
        self.cls_token = nnx.data(_tokens(k_cls, 1, dim, 1e-6, param_dtype) if config.class_token else None)
        reg = _tokens(k_reg, config.reg_tokens, dim, 1e-6, param_dtype) if config.reg_tokens else None
        self.reg_token = nnx.data(reg)
        embed_len = self.patch_embed.num_patches + (0 if config.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = _tokens(k_pos, embed_len, dim, 0.02, param_dtype)
        # timm's torch.linspace(0, drop_path_rate, depth)
        rates = np.linspace(0.0, drop_path_rate, config.depth) if config.depth > 1 else [0.0]
        self.blocks = nnx.List([Block(config, float(r), rngs=rngs, **kw) for r in rates])
        use_fc_norm = (
            config.global_pool in ("avg", "max", "avgmax") if config.fc_norm is None else config.fc_norm
        )
        self.norm = nnx.data(None if use_fc_norm else layer_norm(dim, rngs=rngs, **kw))
        self.fc_norm = nnx.data(layer_norm(dim, rngs=rngs, **kw) if use_fc_norm else None)
        self.num_features = dim
        self.num_classes = num_classes
        self.head = nnx.data(linear_head(dim, num_classes, rngs=rngs, **kw))

    def _pos_embed(self, x: jax.Array) -> jax.Array:
        b, _, d = x.shape
        prefix = [
            jnp.broadcast_to(t[...].astype(x.dtype), (b, t.shape[1], d))
            for t in (self.cls_token, self.reg_token)
            if t is not None
        ]
        pos = self.pos_embed[...].astype(x.dtype)
        if self.no_embed_class:  # patches get position embeddings, then prefix tokens join
            return jnp.concatenate([*prefix, x + pos], axis=1)
        return jnp.concatenate([*prefix, x], axis=1) + pos

    def forward_intermediates(self, x, *, train: bool = False) -> list[jax.Array]:
        """The tokens (prefix tokens first) after each block, before the final norm."""
        x = self._pos_embed(self.patch_embed(x))
        outputs = []
        for block in self.blocks:
            x = block(x, train)
            outputs.append(x)
        return outputs

    def pool_intermediate(self, tokens: jax.Array) -> jax.Array:
        """Mean of an intermediate block's patch tokens, as timm's spatial intermediates pool."""
        return tokens[:, self.num_prefix_tokens :].mean(axis=1)

    def forward_features(self, x, *, train: bool = False):
        x = self.forward_intermediates(x, train=train)[-1]
        return x if self.norm is None else self.norm(x)

    def pool(self, x: jax.Array) -> jax.Array:
        if self.global_pool == "token":
            return x[:, 0]
        if not self.global_pool:
            return x
        patches = x[:, self.num_prefix_tokens :]
        if self.global_pool == "avg":
            return jnp.mean(patches, axis=1)
        if self.global_pool == "max":
            return jnp.max(patches, axis=1)
        return 0.5 * (jnp.max(patches, axis=1) + jnp.mean(patches, axis=1))  # avgmax

    def forward_head(self, x, pre_logits: bool = False, *, train: bool = False):
        x = self.pool(x)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        if pre_logits or self.head is None:
            return x
        return self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's ViT grouping (the same for ``coarse``): embeddings are the stem, one group per
        block, and the final norm joins the last block."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        self.num_classes = num_classes
        head = linear_head(self.num_features, num_classes, rngs=rngs or nnx.Rngs(0), **self._head_kw)
        self.head = nnx.data(head)


# --- position-embedding resampling (timm's resample_abs_pos_embed, without torch) ---------------


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a``."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of PyTorch's 1-D bicubic resize, ``align_corners=False``.

    Without antialias (``upsample_bicubic2d``): source ``(i + 0.5) * in / out - 0.5``, unclamped,
    four taps with A=-0.75, tap indices clamped to the border. With antialias
    (``_upsample_bicubic2d_aa``, Pillow's filter): A=-0.5, the kernel widened by ``in / out`` when
    shrinking, taps that fall outside the input dropped and the remaining weights renormalized.
    """
    scale = in_size / out_size
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)  # int() truncates like C++'s static_cast
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _cubic_kernel((taps - center + 0.5) * inv_scale, -0.5)
            total = w.sum()
            mat[i, lo:hi] = w / total if total != 0.0 else w
        return mat
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src)
    frac = src - base
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        idx = np.clip(base + offset, 0, in_size - 1).astype(np.int64)
        np.add.at(mat, (rows, idx), _cubic_kernel(frac - offset, -0.75))
    return mat


def resample_abs_pos_embed(
    posemb: np.ndarray,
    new_size: tuple[int, int],
    old_size: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    antialias: bool = True,
) -> np.ndarray:
    """Resize the patch part of a ``(1, prefix + H*W, D)`` position embedding to ``new_size`` with
    bicubic interpolation, as timm's ``resample_abs_pos_embed`` (``antialias=True`` is the default
    of timm's checkpoint filter). ``old_size`` defaults to a square grid. The prefix rows are kept."""
    posemb = np.asarray(posemb)
    new_size = tuple(new_size)
    n_patches = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(f"pos_embed has {n_patches} patch positions, not a square grid; give old_size")
        old_size = (side, side)
    old_size = tuple(old_size)
    if old_size[0] * old_size[1] != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch positions, not a {old_size} grid")
    if old_size == new_size:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.astype(np.float64).reshape(old_size[0], old_size[1], -1)
    rows = bicubic_matrix(old_size[0], new_size[0], antialias)
    cols = bicubic_matrix(old_size[1], new_size[1], antialias)
    out = np.einsum("oh,hwd,pw->opd", rows, grid, cols)
    out = out.reshape(1, new_size[0] * new_size[1], -1).astype(posemb.dtype)
    return np.concatenate([prefix, out], axis=1)


def _convert_dinov2(state: StateDict) -> StateDict:
    """Meta's original DINOv2 layout: registers as ``register_tokens`` and a pos_embed row for the
    class token even with registers, which timm folds into ``cls_token`` (its ``no_embed_class``)."""
    state = dict(state)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        pos = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state.pop("cls_token") + pos[:, :1]
        state["pos_embed"] = pos[:, 1:]
    return state


def checkpoint_filter(state: StateDict, model: VisionTransformer, antialias: bool = True) -> StateDict:
    """timm's ``checkpoint_filter_fn`` for these models: convert Meta's DINOv2 layout, drop the old
    ``pre_logits`` layer, and resample ``pos_embed`` to the model's patch grid.

    The checkpoint's grid is the config's training resolution when that accounts for every position
    (timm's ``get_pretrained_grid_size``), otherwise assumed square.
    """
    if "mask_token" in state:
        state = _convert_dinov2(state)
    state = {k: v for k, v in state.items() if "pre_logits" not in k}
    pos = state.get("pos_embed")
    if pos is None or np.ndim(pos) != 3:
        return state
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    n_patches = pos.shape[1] - num_prefix
    weight = state.get("patch_embed.proj.weight")
    old_size = None
    if weight is not None and np.ndim(weight) == 4:
        cfg_size = _to_2tuple(model.config.img_size)
        grid = (cfg_size[0] // weight.shape[-2], cfg_size[1] // weight.shape[-1])
        old_size = grid if grid[0] * grid[1] == n_patches else None
    if old_size is None and (n_patches < 1 or math.isqrt(n_patches) ** 2 != n_patches):
        # a grid this cannot infer is another layout (DeiT's distillation token, DINOv2's registers
        # into a model without): left as it is, the mapping lists it with the checkpoint's other misfits
        return state
    target_len = model.pos_embed.shape[1]
    if pos.shape[1] != target_len or (old_size is not None and old_size != model.grid_size):
        state["pos_embed"] = resample_abs_pos_embed(
            pos, model.grid_size, old_size=old_size, num_prefix_tokens=num_prefix, antialias=antialias
        )
    return state


def adapt_to_img_size(
    saved: VisionTransformer, model: VisionTransformer, weights: dict[tuple, np.ndarray]
) -> dict[tuple, np.ndarray]:
    """A run's weights, saved by ``saved``, for ``model``: the same architecture at another input size,
    whose patch grid and so ``pos_embed`` differ (resampled as ``checkpoint_filter`` does)."""
    path = ("pos_embed",)
    if path not in weights or saved.grid_size == model.grid_size:
        return weights
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    resampled = resample_abs_pos_embed(
        np.asarray(weights[path]), model.grid_size, old_size=saved.grid_size, num_prefix_tokens=prefix
    )
    return {**weights, path: resampled}


WEIGHT_RULES = (
    conv(r"patch_embed\.proj"),
    param(r"cls_token|reg_token|pos_embed"),
    layernorm(r"blocks\.\d+\.norm[12]"),
    linear(r"blocks\.\d+\.attn\.(qkv|proj)"),
    linear(r"blocks\.\d+\.mlp\.fc[12]"),
    param(r"blocks\.\d+\.ls[12]\.gamma"),
    layernorm(r"norm|fc_norm"),
    linear(r"head"),
)

# timm 1.0 default tag, every pretrained tag, the default pretrained_cfg fields that differ per model
_IN21K_FT = "augreg_in21k_ft_in1k"
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_PRETRAINED = {
    "vit_tiny_patch16_224": (_IN21K_FT, ("augreg_in21k", _IN21K_FT)),
    "vit_small_patch16_224": (_IN21K_FT, ("augreg_in1k", "augreg_in21k", _IN21K_FT, "dino")),
    "vit_base_patch16_224": (
        "augreg2_in21k_ft_in1k",
        (
            "augreg2_in21k_ft_in1k",
            "augreg_in1k",
            "augreg_in21k",
            _IN21K_FT,
            "bamboo",
            "dino",
            "mae",
            "orig_in21k",
            "orig_in21k_ft_in1k",
            "sam_in1k",
        ),
    ),
    "vit_large_patch16_224": (_IN21K_FT, ("augreg_in21k", _IN21K_FT, "mae", "orig_in21k")),
    "vit_tiny_patch16_384": (_IN21K_FT, (_IN21K_FT,)),
    "vit_small_patch16_384": (_IN21K_FT, ("augreg_in1k", _IN21K_FT)),
    "vit_base_patch16_384": (_IN21K_FT, ("augreg_in1k", _IN21K_FT, "orig_in21k_ft_in1k")),
    "vit_large_patch16_384": (_IN21K_FT, (_IN21K_FT,)),
    "vit_small_patch32_224": (_IN21K_FT, ("augreg_in21k", _IN21K_FT)),
    "vit_base_patch32_224": (_IN21K_FT, ("augreg_in1k", "augreg_in21k", _IN21K_FT, "orig_in21k", "sam_in1k")),
    "vit_large_patch32_224": ("orig_in21k", ("orig_in21k",)),
    "vit_small_patch32_384": (_IN21K_FT, (_IN21K_FT,)),
    "vit_base_patch32_384": (_IN21K_FT, ("augreg_in1k", _IN21K_FT)),
    "vit_large_patch32_384": ("orig_in21k_ft_in1k", ("orig_in21k_ft_in1k",)),
}
for _name in CONFIGS:
    if _name.endswith("dinov2"):
        _PRETRAINED[_name] = ("lvd142m", ("lvd142m",))


def _default_cfg(name: str, config: ViTConfig, tag: str) -> PretrainedCfg:
    dinov2 = name.endswith("dinov2")
    return PretrainedCfg(
        architecture=name,
        tag=tag,
        hf_hub_id=f"timm/{name}.{tag}",
        input_size=(3, config.img_size, config.img_size),
        interpolation="bicubic",
        crop_pct=0.9 if config.img_size == 224 else 1.0,
        crop_mode="center",
        **({} if dinov2 else _INCEPTION),  # DINOv2 keeps the ImageNet mean/std defaults
        num_classes=0 if dinov2 or name == "vit_large_patch32_224" else 1000,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
    )


def _build(config: ViTConfig, **kwargs) -> VisionTransformer:
    return VisionTransformer(config, **kwargs)


for _name, _config in CONFIGS.items():
    _tag, _tags = _PRETRAINED[_name]
    register_model(
        ModelEntry(
            name=_name,
            family="vit",
            build=partial(_build, _config),
            default_cfg=_default_cfg(_name, _config, _tag),
            rules=WEIGHT_RULES,
            tags=_tags,
            filter_state_dict=checkpoint_filter,
            adapt_to_img_size=adapt_to_img_size,
        )
    )
