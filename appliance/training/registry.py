"""``method.type`` -> LLM recipe. Add a method by writing ``recipes/<name>.py`` and its hyperparameters class.

``RECIPES`` (every recipe module by method) loads torch on first use;
:func:`capabilities` does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.trainkit.registry import RecipeCapabilities, RecipeRegistry
from appliance.training.hyperparameters import HYPERPARAMETERS

if TYPE_CHECKING:
    from appliance.training.protocol import Recipe

REGISTRY = RecipeRegistry("appliance.training.recipes", HYPERPARAMETERS)
__getattr__ = REGISTRY.module_getattr(__name__)


def get_recipe(method: str) -> Recipe:
    """The recipe for ``method``.

    Raises:
        InvalidRequestError: Unknown method.
    """
    return REGISTRY.recipe(method)


def capabilities(method: str) -> RecipeCapabilities:
    """What ``method`` supports (DP, FSDP, its output); loads no torch."""
    return REGISTRY.capabilities(method)
