"""Loading a recipe on the driver: common.recipe's validation plus what only the worker side knows.

common/ sits below workers/ and never imports it; this is where the two meet. Every driver command
loads its recipe through here, so an unknown model or loss, a model of another task or a stage that
names a part the model lacks is a bad recipe (exit 2) before any data is read or worker started.
"""

from __future__ import annotations

from typing import Any

from common.recipe import Recipe
from common.recipe import load_recipe as _load
from common.recipe import validate_recipe as _validate
from workers.recipe_check import CHECKS


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    return _validate(data, source=source, checks=CHECKS)


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    return _load(path, overrides, checks=CHECKS)
