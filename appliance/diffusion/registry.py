"""``method.type`` -> image recipe. Add a method by writing ``recipes/<name>.py`` and listing it here."""

from __future__ import annotations

from appliance.diffusion.protocol import Recipe
from appliance.diffusion.recipes import dreambooth, dreambooth_lora, lora
from appliance.errors import InvalidRequestError

RECIPES: dict[str, Recipe] = {
    lora.method: lora,
    dreambooth.method: dreambooth,
    dreambooth_lora.method: dreambooth_lora,
}


def get_recipe(method: str) -> Recipe:
    """The recipe for ``method``.

    Raises:
        InvalidRequestError: Unknown method.
    """
    try:
        return RECIPES[method]
    except KeyError:
        raise InvalidRequestError(
            f"`method.type` must be one of {', '.join(map(repr, RECIPES))}; got {method!r}", param="method.type"
        ) from None
