"""ConvNeXt (Liu et al. 2022) with timm's module names and math, in NHWC.

timm's channels-first ``LayerNorm2d`` and its channels-last ``LayerNorm`` are the same operation
here: a LayerNorm over the last axis (eps 1e-6). The small variants (atto to nano) use ``conv_mlp``:
their MLP is a pair of 1x1 convolutions, which in NHWC compute what the larger variants' linear
layers compute; only the checkpoint tensors' shapes differ, so the module type follows timm's to
keep the mapping a plain conv/linear rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vision_ft.models.base import Backbone
from vision_ft.models.layers import Conv, DropPath, Linear, gelu, torch_padding
from vision_ft.models.registry import ModelEntry, PretrainedCfg, register_model
from vision_ft.weights.mapping import conv, layernorm, linear, param

LN_EPS = 1e-6  # timm's LayerNorm / LayerNorm2d default, not PyTorch's 1e-5


@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    conv_mlp: bool = False  # 1x1-conv MLP (timm's small variants) instead of nn.Linear
    kernel_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6  # layer scale ``gamma``; None disables it


CONFIGS = {
    "convnext_atto": ConvNeXtConfig((2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": ConvNeXtConfig((2, 2, 6, 2), (48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": ConvNeXtConfig((2, 2, 6, 2), (64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": ConvNeXtConfig((2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny": ConvNeXtConfig((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ConvNeXtConfig((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ConvNeXtConfig((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ConvNeXtConfig((3, 3, 27, 3), (192, 384, 768, 1536)),
}


@partial(jax.jit, static_argnums=(1, 2))
def _init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """timm's _init_weights: trunc_normal_(std=0.02) on every conv and linear weight (biases are
    zero). Its bounds are absolute (+-2, i.e. 100 std), so that is a plain normal; jax's
    truncated_normal would cut at +-2 std. One jit per shape: eager ops would compile twice."""
    return 0.02 * jax.random.normal(key, shape, dtype)


def _conv(in_chs, out_chs, kernel_size, *, stride=1, groups=1, padding="VALID", rngs, **kw) -> Conv:
    """A biased conv; ``padding="torch"`` is timm's symmetric padding."""
    if padding == "torch":
        padding = torch_padding(kernel_size, stride)
    return Conv(
        in_chs,
        out_chs,
        (kernel_size, kernel_size),
        strides=stride,
        padding=padding,
        feature_group_count=groups,
        use_bias=True,
        kernel_init=_init,
        rngs=rngs,
        **kw,
    )


def _dense(in_features: int, out_features: int, *, rngs: nnx.Rngs, **kw) -> Linear:
    return Linear(in_features, out_features, kernel_init=_init, rngs=rngs, **kw)


def _layer_norm(dim: int, *, rngs: nnx.Rngs, **kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=LN_EPS, use_fast_variance=False, rngs=rngs, **kw)


class Mlp(nnx.Module):
    """``fc2(gelu(fc1(x)))`` over channels; ``fc1``/``fc2`` are 1x1 convs with ``conv_mlp``."""

    def __init__(self, dim: int, hidden: int, conv_mlp: bool, *, rngs: nnx.Rngs, **kw):
        layer = partial(_conv, kernel_size=1) if conv_mlp else _dense
        self.fc1 = layer(dim, hidden, rngs=rngs, **kw)
        self.fc2 = layer(hidden, dim, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class ConvNeXtBlock(nnx.Module):
    """``x + drop_path(gamma * mlp(norm(conv_dw(x))))`` with a 7x7 depthwise conv."""

    def __init__(self, dim: int, config: ConvNeXtConfig, drop_path: float, *, rngs: nnx.Rngs, **kw):
        k = config.kernel_size
        self.conv_dw = _conv(dim, dim, k, groups=dim, padding="torch", rngs=rngs, **kw)
        self.norm = _layer_norm(dim, rngs=rngs, **kw)
        self.mlp = Mlp(dim, int(config.mlp_ratio * dim), config.conv_mlp, rngs=rngs, **kw)
        gamma = None
        if config.ls_init_value is not None:
            gamma = nnx.Param(jnp.full((dim,), config.ls_init_value, dtype=kw["param_dtype"]))
        self.gamma = nnx.data(gamma)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.mlp(self.norm(self.conv_dw(x)))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        return self.drop_path(y, train=train) + x


class ConvNeXtStage(nnx.Module):
    """timm's ``downsample`` Sequential (``0`` norm, ``1`` 2x2 stride-2 conv) on every stage but
    the first, whose input already has its width; then the blocks."""

    def __init__(self, in_chs, out_chs, stride, config, drop_paths, *, rngs: nnx.Rngs, **kw):
        downsample = None
        if in_chs != out_chs or stride > 1:
            norm = _layer_norm(in_chs, rngs=rngs, **kw)
            downsample = nnx.List([norm, _conv(in_chs, out_chs, stride, stride=stride, rngs=rngs, **kw)])
        self.downsample = nnx.data(downsample)
        self.blocks = nnx.List([ConvNeXtBlock(out_chs, config, dp, rngs=rngs, **kw) for dp in drop_paths])

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.downsample is not None:
            norm, conv_layer = self.downsample
            x = conv_layer(norm(x))
        for block in self.blocks:
            x = block(x, train)
        return x


class NormHead(nnx.Module):
    """timm's ``NormMlpClassifierHead`` without hidden layer: average pool, LayerNorm, classifier."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs, **kw):
        self.norm = _layer_norm(dim, rngs=rngs, **kw)
        self.fc = nnx.data(_dense(dim, num_classes, rngs=rngs, **kw) if num_classes > 0 else None)

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        x = self.norm(jnp.mean(x, axis=(1, 2)))
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)


def drop_path_rates(drop_path_rate: float, depths) -> list[list[float]]:
    """timm's ``calculate_drop_path_rates(rate, depths, stagewise=True)``: despite the name, one
    linear ramp from 0 to ``rate`` over all blocks (float32, as torch.linspace), split by stage."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths), dtype=np.float32)
    bounds = np.cumsum(depths)[:-1]
    return [[float(r) for r in part] for part in np.split(rates, bounds)]


class ConvNeXt(Backbone):
    def __init__(
        self,
        config: ConvNeXtConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
        **_unused,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self._head_kw = kw
        self.config = config
        dims, p = config.dims, config.patch_size
        self.stem = nnx.List(
            [_conv(in_chans, dims[0], p, stride=p, rngs=rngs, **kw), _layer_norm(dims[0], rngs=rngs, **kw)]
        )
        rates = drop_path_rates(drop_path_rate, config.depths)
        stages, prev = [], dims[0]
        for i, (dim, dp) in enumerate(zip(dims, rates, strict=True)):
            stages.append(ConvNeXtStage(prev, dim, 2 if i > 0 else 1, config, dp, rngs=rngs, **kw))
            prev = dim
        self.stages = nnx.List(stages)
        self.input_multiple = p * 2 ** (len(stages) - 1)
        self.num_features = prev
        self.num_classes = num_classes
        self.head = NormHead(prev, num_classes, rngs=rngs, **kw)

    def forward_intermediates(self, x, *, train: bool = False) -> list[jax.Array]:
        """The output of each of the four stages."""
        conv_layer, norm = self.stem
        x = norm(conv_layer(x))
        outputs = []
        for stage in self.stages:
            x = stage(x, train)
            outputs.append(x)
        return outputs

    def forward_features(self, x, *, train: bool = False):
        return self.forward_intermediates(x, train=train)[-1]

    def forward_head(self, x, pre_logits: bool = False, *, train: bool = False):
        return self.head(x, pre_logits=pre_logits)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's ConvNeXt grouping: the stem, then stages (coarse) or blocks, a stage's downsample
        layer leading its first block. ``norm_pre`` (timm's Identity here) is kept for parity."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        """A new classifier (none for 0); ``head.norm`` is kept, as timm's ``reset_classifier``."""
        self.num_classes = num_classes
        fc = None
        if num_classes > 0:
            fc = _dense(self.num_features, num_classes, rngs=rngs or nnx.Rngs(0), **self._head_kw)
        self.head.fc = nnx.data(fc)


def weight_rules(config: ConvNeXtConfig) -> tuple:
    """Module names mirror timm's; the Sequentials ``stem`` and ``downsample`` keep their indices."""
    mlp = conv if config.conv_mlp else linear
    block = r"stages\.\d\.blocks\.\d+"
    return (
        conv(r"stem\.0"),
        layernorm(r"stem\.1"),
        layernorm(r"stages\.\d\.downsample\.0"),
        conv(r"stages\.\d\.downsample\.1"),
        conv(rf"{block}\.conv_dw"),
        layernorm(rf"{block}\.norm"),
        mlp(rf"{block}\.mlp\.fc[12]"),
        param(rf"{block}\.gamma"),
        layernorm(r"head\.norm"),
        linear(r"head\.fc"),
    )


# (default tag, crop_pct, every pretrained tag timm 1.0.31 lists)
_PRETRAINED = {
    "convnext_atto": ("d2_in1k", 0.875, ("d2_in1k",)),
    "convnext_femto": ("d1_in1k", 0.875, ("d1_in1k",)),
    "convnext_pico": ("d1_in1k", 0.875, ("d1_in1k",)),
    "convnext_nano": (
        "in12k_ft_in1k",
        0.95,
        ("d1h_in1k", "in12k", "in12k_ft_in1k", "r384_ad_in12k", "r384_in12k", "r384_in12k_ft_in1k"),
    ),
    "convnext_tiny": (
        "in12k_ft_in1k",
        0.95,
        (
            "dinov3_lvd1689m",
            "eupe_lvd1689m",
            "fb_in1k",
            "fb_in22k",
            "fb_in22k_ft_in1k",
            "fb_in22k_ft_in1k_384",
            "in12k",
            "in12k_ft_in1k",
            "in12k_ft_in1k_384",
        ),
    ),
    "convnext_small": (
        "in12k_ft_in1k",
        0.95,
        (
            "dinov3_lvd1689m",
            "eupe_lvd1689m",
            "fb_in1k",
            "fb_in22k",
            "fb_in22k_ft_in1k",
            "fb_in22k_ft_in1k_384",
            "in12k",
            "in12k_ft_in1k",
            "in12k_ft_in1k_384",
        ),
    ),
    "convnext_base": (
        "fb_in22k_ft_in1k",
        0.875,
        (
            "clip_laion2b",
            "clip_laion2b_augreg",
            "clip_laion2b_augreg_ft_in1k",
            "clip_laion2b_augreg_ft_in12k",
            "clip_laion2b_augreg_ft_in12k_in1k",
            "clip_laion2b_augreg_ft_in12k_in1k_384",
            "clip_laiona",
            "clip_laiona_320",
            "clip_laiona_augreg_320",
            "clip_laiona_augreg_ft_in1k_384",
            "dinov3_lvd1689m",
            "eupe_lvd1689m",
            "fb_in1k",
            "fb_in22k",
            "fb_in22k_ft_in1k",
            "fb_in22k_ft_in1k_384",
        ),
    ),
    "convnext_large": (
        "fb_in22k_ft_in1k",
        0.875,
        ("dinov3_lvd1689m", "fb_in1k", "fb_in22k", "fb_in22k_ft_in1k", "fb_in22k_ft_in1k_384"),
    ),
}


def _build(config: ConvNeXtConfig, **kwargs) -> ConvNeXt:
    return ConvNeXt(config, **kwargs)


for _name, _config in CONFIGS.items():
    _tag, _crop, _tags = _PRETRAINED[_name]
    register_model(
        ModelEntry(
            name=_name,
            family="convnext",
            build=partial(_build, _config),
            default_cfg=PretrainedCfg(
                architecture=_name,
                tag=_tag,
                hf_hub_id=f"timm/{_name}.{_tag}",
                crop_pct=_crop,
                first_conv="stem.0",
                classifier="head.fc",
                license="apache-2.0",
            ),
            rules=weight_rules(_config),
            tags=_tags,
        )
    )
