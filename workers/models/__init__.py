"""Registered models (see registry.py for the contract a model module follows).

Each model module registers itself on import; add a new one to the import list below.
"""

from __future__ import annotations

from workers.models import (
    basenet,  # noqa: F401
    mobilenet_depth,  # noqa: F401
    resnet_seg,  # noqa: F401
    resunet,  # noqa: F401
    unet,  # noqa: F401  (registers unet56, unet224)
)
from workers.models.registry import MODELS, build_model, count_params, model_task, model_variants
from workers.models.unet import UNet56, UNet224

__all__ = ["MODELS", "UNet56", "UNet224", "build_model", "count_params", "model_task", "model_variants"]
