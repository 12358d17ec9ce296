"""ResNet (He et al. 2015) and ResNet-D (Bag of Tricks) with timm's module names and math."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from vision_ft.models.base import Backbone
from vision_ft.models.layers import DropPath, batch_norm, conv2d, linear_head
from vision_ft.models.registry import ModelEntry, PretrainedCfg, register_model
from vision_ft.weights.mapping import batchnorm, conv, linear


@dataclass(frozen=True)
class ResNetConfig:
    block: str | tuple[str, str, str, str]  # "basic" or "bottleneck", for all stages or per stage
    layers: tuple[int, int, int, int]
    deep_stem: bool = False  # ResNet-D: three 3x3 convs instead of one 7x7
    stem_width: int = 64
    avg_down: bool = False  # ResNet-D: average-pool before the 1x1 projection shortcut
    channels: tuple[int, int, int, int] = (64, 128, 256, 512)  # planes of each stage

    def stage_blocks(self) -> tuple[str, str, str, str]:
        return (self.block,) * 4 if isinstance(self.block, str) else self.block


CONFIGS = {
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2)),
    "resnet34": ResNetConfig("basic", (3, 4, 6, 3)),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetConfig("bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetConfig("bottleneck", (3, 8, 36, 3)),
    "resnet50d": ResNetConfig("bottleneck", (3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True),
    # timm's tiny test model (0.47 M parameters), small enough for the engine's tests to run fast
    "test_resnet": ResNetConfig(
        ("basic", "basic", "bottleneck", "basic"),
        (1, 1, 1, 1),
        deep_stem=True,
        stem_width=16,
        avg_down=True,
        channels=(32, 48, 48, 96),
    ),
}


def avg_pool_ceil(x: jax.Array, size: int) -> jax.Array:
    """PyTorch AvgPool2d(size, size, ceil_mode=True, count_include_pad=False) in NHWC: a partial
    window at the bottom/right edge averages only the pixels it covers."""
    h, w = x.shape[1:3]
    pad = ((0, 0), (0, -h % size), (0, -w % size), (0, 0))
    window, strides = (1, size, size, 1), (1, size, size, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    count = jax.lax.reduce_window(jnp.ones((1, h, w, 1), x.dtype), 0.0, jax.lax.add, window, strides, pad)
    return total / count


class Downsample(nnx.Module):
    """Projection shortcut. timm's Sequential indices are kept: ``0`` conv, ``1`` BN, or with
    ``avg_down``, ``0`` pool (no parameters), ``1`` conv, ``2`` BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, avg_down: bool, *, rngs: nnx.Rngs, **kw):
        self.pool_size = stride if avg_down and stride > 1 else 0
        conv_stride = 1 if avg_down else stride
        layers = [None] if avg_down else []
        layers.append(conv2d(in_chs, out_chs, 1, stride=conv_stride, rngs=rngs, **kw))
        layers.append(batch_norm(out_chs, rngs=rngs, **kw))
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.pool_size:
            x = avg_pool_ceil(x, self.pool_size)
        conv_layer, bn = self.layers[-2], self.layers[-1]
        return bn(conv_layer(x), use_running_average=not train)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, in_chs, planes, stride, downsample, drop_path, *, rngs, **kw):
        self.conv1 = conv2d(in_chs, planes, 3, stride=stride, rngs=rngs, **kw)
        self.bn1 = batch_norm(planes, rngs=rngs, **kw)
        self.conv2 = conv2d(planes, planes, 3, rngs=rngs, **kw)
        self.bn2 = batch_norm(planes, rngs=rngs, **kw)
        self.bn2.scale.set_value(jnp.zeros_like(self.bn2.scale.get_value()))  # timm's zero_init_last
        self.downsample = downsample
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x, train: bool):
        ura = not train
        shortcut = x if self.downsample is None else self.downsample(x, train)
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        return jax.nn.relu(self.drop_path(y, train=train) + shortcut)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_chs, planes, stride, downsample, drop_path, *, rngs, **kw):
        out_chs = planes * self.expansion
        self.conv1 = conv2d(in_chs, planes, 1, rngs=rngs, **kw)
        self.bn1 = batch_norm(planes, rngs=rngs, **kw)
        self.conv2 = conv2d(planes, planes, 3, stride=stride, rngs=rngs, **kw)
        self.bn2 = batch_norm(planes, rngs=rngs, **kw)
        self.conv3 = conv2d(planes, out_chs, 1, rngs=rngs, **kw)
        self.bn3 = batch_norm(out_chs, rngs=rngs, **kw)
        self.bn3.scale.set_value(jnp.zeros_like(self.bn3.scale.get_value()))  # timm's zero_init_last
        self.downsample = downsample
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x, train: bool):
        ura = not train
        shortcut = x if self.downsample is None else self.downsample(x, train)
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        return jax.nn.relu(self.drop_path(y, train=train) + shortcut)


class DeepStem(nnx.Module):
    """ResNet-D stem; the Sequential indices 0, 1, 3, 4, 6 of timm's ``conv1`` hold parameters."""

    def __init__(self, in_chans: int, width: int, out_chs: int, *, rngs: nnx.Rngs, **kw):
        self.layers = nnx.List(
            [
                conv2d(in_chans, width, 3, stride=2, rngs=rngs, **kw),
                batch_norm(width, rngs=rngs, **kw),
                None,
                conv2d(width, width, 3, rngs=rngs, **kw),
                batch_norm(width, rngs=rngs, **kw),
                None,
                conv2d(width, out_chs, 3, rngs=rngs, **kw),
            ]
        )

    def __call__(self, x, train: bool):
        c0, b1, _, c3, b4, _, c6 = self.layers
        x = jax.nn.relu(b1(c0(x), use_running_average=not train))
        x = jax.nn.relu(b4(c3(x), use_running_average=not train))
        return c6(x)


class ResNet(Backbone):
    def __init__(
        self,
        config: ResNetConfig,
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
        if config.deep_stem:
            stem_chs = 2 * config.stem_width  # timm's inplanes for a deep stem
            self.conv1 = DeepStem(in_chans, config.stem_width, stem_chs, rngs=rngs, **kw)
        else:
            stem_chs = 64
            self.conv1 = conv2d(in_chans, stem_chs, 7, stride=2, rngs=rngs, **kw)
        self.bn1 = batch_norm(stem_chs, rngs=rngs, **kw)
        total_blocks, block_idx, in_chs = sum(config.layers), 0, stem_chs
        stages = zip(config.layers, config.channels, config.stage_blocks(), strict=True)
        for stage, (depth, planes, block) in enumerate(stages):
            block_cls = BasicBlock if block == "basic" else Bottleneck
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                out_chs = planes * block_cls.expansion
                downsample = None
                if i == 0 and (stride != 1 or in_chs != out_chs):
                    downsample = Downsample(in_chs, out_chs, stride, config.avg_down, rngs=rngs, **kw)
                dpr = drop_path_rate * block_idx / max(total_blocks - 1, 1)
                blocks.append(block_cls(in_chs, planes, stride, downsample, dpr, rngs=rngs, **kw))
                in_chs, block_idx = out_chs, block_idx + 1
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.num_features = in_chs
        self.num_classes = num_classes
        self.fc = nnx.data(linear_head(in_chs, num_classes, rngs=rngs, **kw))

    def forward_intermediates(self, x, *, train: bool = False) -> list[jax.Array]:
        """The output of each of the four stages."""
        x = self.conv1(x, train) if isinstance(self.conv1, DeepStem) else self.conv1(x)
        x = jax.nn.relu(self.bn1(x, use_running_average=not train))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, train)
            outputs.append(x)
        return outputs

    def forward_features(self, x, *, train: bool = False):
        return self.forward_intermediates(x, train=train)[-1]

    def forward_head(self, x, pre_logits: bool = False, *, train: bool = False):
        x = jnp.mean(x, axis=(1, 2))
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping for layer-wise settings: the stem, then stages (coarse) or blocks."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nnx.data(
            linear_head(self.num_features, num_classes, rngs=rngs or nnx.Rngs(0), **self._head_kw)
        )


def weight_rules(config: ResNetConfig) -> tuple:
    """Module names mirror timm's, so most targets are the timm paths themselves; Downsample and
    the deep stem keep timm's Sequential indices under ``layers``."""
    ds_conv, ds_bn = ("1", "2") if config.avg_down else ("0", "1")
    return (
        conv(r"conv1"),
        conv(r"conv1\.([036])", r"conv1.layers.\1"),
        batchnorm(r"conv1\.([14])", r"conv1.layers.\1"),
        batchnorm(r"bn1"),
        conv(r"layer\d\.\d+\.conv\d"),
        batchnorm(r"layer\d\.\d+\.bn\d"),
        conv(rf"(layer\d\.\d+)\.downsample\.({ds_conv})", r"\1.downsample.layers.\2"),
        batchnorm(rf"(layer\d\.\d+)\.downsample\.({ds_bn})", r"\1.downsample.layers.\2"),
        linear(r"fc"),
    )


_DEFAULT_TAGS = {
    "resnet18": ("a1_in1k", ("a1_in1k", "a2_in1k", "a3_in1k", "gluon_in1k", "tv_in1k")),
    "resnet34": ("a1_in1k", ("a1_in1k", "a2_in1k", "a3_in1k", "bt_in1k", "gluon_in1k", "tv_in1k")),
    "resnet50": (
        "a1_in1k",
        ("a1_in1k", "a1h_in1k", "a2_in1k", "a3_in1k", "gluon_in1k", "tv2_in1k", "tv_in1k"),
    ),
    "resnet101": (
        "a1h_in1k",
        ("a1_in1k", "a1h_in1k", "a2_in1k", "a3_in1k", "gluon_in1k", "tv2_in1k", "tv_in1k"),
    ),
    "resnet152": (
        "a1h_in1k",
        ("a1_in1k", "a1h_in1k", "a2_in1k", "a3_in1k", "gluon_in1k", "tv2_in1k", "tv_in1k"),
    ),
    "resnet50d": ("ra2_in1k", ("a1_in1k", "a2_in1k", "a3_in1k", "gluon_in1k", "ra2_in1k")),
    "test_resnet": ("r160_in1k", ("r160_in1k",)),
}


# where timm's pretrained_cfg differs from the defaults above
_CFG_OVERRIDES = {
    "resnet50d": dict(crop_pct=0.875),
    "test_resnet": dict(
        input_size=(3, 160, 160), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    ),
}


def _build(config: ResNetConfig, **kwargs) -> ResNet:
    return ResNet(config, **kwargs)


for _name, _config in CONFIGS.items():
    _tag, _tags = _DEFAULT_TAGS[_name]
    register_model(
        ModelEntry(
            name=_name,
            family="resnet",
            build=partial(_build, _config),
            default_cfg=PretrainedCfg(
                architecture=_name,
                tag=_tag,
                hf_hub_id=f"timm/{_name}.{_tag}",
                first_conv="conv1.0" if _config.deep_stem else "conv1",
                classifier="fc",
                license="apache-2.0",
                **{"crop_pct": 0.95, **_CFG_OVERRIDES.get(_name, {})},
            ),
            rules=weight_rules(_config),
            tags=_tags,
        )
    )
