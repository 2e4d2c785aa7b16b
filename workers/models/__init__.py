"""The model registry: recipes name a model ("unet56", "unet224"); build_model makes it."""

from __future__ import annotations

from typing import Any

from torch import nn

from orchestrator.registry import Registry

MODELS: Registry[type[nn.Module]] = Registry("model")

# Imported for its side effect: registering the models in MODELS.
from workers.models import unet  # noqa: E402, F401
from workers.models.unet import UNet56, UNet224, count_params  # noqa: E402

__all__ = ["MODELS", "UNet56", "UNet224", "build_model", "count_params"]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model; unknown names raise UnknownNameError listing valid ones."""
    return MODELS.get(name)(**kwargs)
