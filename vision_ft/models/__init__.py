"""Architecture families; importing this package registers every model."""

from vision_ft.models import convnext, efficientnet, resnet, vit  # noqa: F401
from vision_ft.models.factory import create_model
from vision_ft.models.registry import PretrainedCfg, list_models

__all__ = ["PretrainedCfg", "create_model", "list_models"]
