"""vision-ft: transfer learning for computer vision in JAX with timm backbones in Flax NNX."""

from vision_ft.models import PretrainedCfg, create_model, list_models

__all__ = ["PretrainedCfg", "create_model", "list_models"]
__version__ = "0.2.0"
