"""``method.type`` -> recipe. Add a method by writing ``recipes/<name>.py`` and listing it here."""

from __future__ import annotations

from appliance.errors import InvalidRequestError
from appliance.training.protocol import Recipe
from appliance.training.recipes import lora, qlora

RECIPES: dict[str, Recipe] = {
    lora.method: lora,
    qlora.method: qlora,
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
