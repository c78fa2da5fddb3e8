"""``method.type`` -> image recipe. Add a method by writing ``recipes/<name>.py`` and its hyperparameters class."""

from __future__ import annotations

from typing import Any

from appliance.diffusion.hyperparameters import HYPERPARAMETERS
from appliance.trainkit.registry import RecipeRegistry

REGISTRY = RecipeRegistry("appliance.diffusion.recipes", HYPERPARAMETERS)
#: What each method supports (DP, FSDP, its output), read without loading torch.
capabilities = REGISTRY.capabilities


def get_recipe(method: str) -> Any:
    """The image recipe for ``method`` (:class:`appliance.diffusion.protocol.Recipe`); raises for an unknown one."""
    return REGISTRY.recipe(method)


def __getattr__(name: str) -> Any:
    if name == "RECIPES":  # every recipe module by method, loaded on first use
        return REGISTRY.recipes()
    raise AttributeError(f"module 'appliance.diffusion.registry' has no attribute {name!r}")
