"""vision-ft: transfer learning for computer vision in JAX with timm backbones in Flax NNX."""

from typing import TYPE_CHECKING

__all__ = ["PretrainedCfg", "create_model", "list_models"]
__version__ = "0.3.0"

if TYPE_CHECKING:
    from vision_ft.models import PretrainedCfg, create_model, list_models


def __getattr__(name: str):
    # imported on first use, so that the `vision-ft` executable can choose its host allocator and
    # restart (entry.py) before JAX is loaded
    if name in __all__:
        from vision_ft import models

        return getattr(models, name)
    raise AttributeError(f"module 'vision_ft' has no attribute {name!r}")
