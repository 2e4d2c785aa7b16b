"""Registered models (see registry.py for the contract a model module follows).

Each model module registers itself on import; every module of this package is imported here, so a
new model is one new module and nothing else. (A model outside the package is named by import path
or an `orchestrator.models` entry point instead: registry.py.)
"""

from __future__ import annotations

import importlib
import pkgutil

from workers.models.registry import MODELS, build_model, count_params, model_task, model_variants
from workers.models.unet import UNet56, UNet224

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MODELS", "UNet56", "UNet224", "build_model", "count_params", "model_task", "model_variants"]
