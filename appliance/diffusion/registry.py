"""``method.type`` -> image recipe. Add a method by writing ``recipes/<name>.py`` and its hyperparameters class.

``RECIPES`` (every recipe module by method) loads torch on first use;
``capabilities(method)`` (DP, FSDP, its output) does not.
"""

from __future__ import annotations

from appliance.diffusion.hyperparameters import HYPERPARAMETERS
from appliance.trainkit.registry import RecipeRegistry

REGISTRY = RecipeRegistry("appliance.diffusion.recipes", HYPERPARAMETERS)
__getattr__ = REGISTRY.module_getattr(__name__)
capabilities = REGISTRY.capabilities
#: The image recipe (:class:`appliance.diffusion.protocol.Recipe`) of a method; raises for an unknown one.
get_recipe = REGISTRY.recipe
