"""``method.type`` -> recipe, and what each method declares it supports (no method is known by its name).

A method is two halves: its hyperparameters class (torch-free: fields, rules
and :class:`RecipeCapabilities`, so the API process can validate a job
cheaply) and its recipe module ``<package>.<method>`` (the code, loaded on
first use; it exposes the same ``capabilities``). A :class:`RecipeRegistry`
joins the two for one modality.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from appliance.errors import InvalidRequestError

Output = Literal["adapter", "full_weights"]


@dataclass(frozen=True)
class RecipeCapabilities:
    """What a training method supports.

    Attributes:
        supports_dp: Differentially private training (DP-SGD, the ``dp`` hyperparameter).
        supports_fsdp: Sharding the base model over data-parallel workers (``compute.sharding`` ``fsdp``).
        output: ``adapter`` (small weights served on top of the base model) or
            ``full_weights`` (replaces base model weights).
    """

    supports_dp: bool = False
    supports_fsdp: bool = False
    output: Output = "adapter"


class RecipeRegistry:
    """One modality's methods: their hyperparameters classes and, loaded on demand, their recipe modules.

    Args:
        package: Where the recipe modules are (``appliance.training.recipes``); method ``m`` is ``<package>.m``.
        hyperparameters: ``method.type`` -> hyperparameters class, each with a ``capabilities`` class attribute.
    """

    def __init__(self, package: str, hyperparameters: Mapping[str, type]) -> None:
        self.package = package
        self.hyperparameters = hyperparameters

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.hyperparameters)

    def check(self, method: str) -> str:
        """``method`` if known.

        Raises:
            InvalidRequestError: Unknown method.
        """
        if method not in self.hyperparameters:
            raise InvalidRequestError(
                f"`method.type` must be one of {', '.join(map(repr, self.hyperparameters))}; got {method!r}",
                param="method.type",
            )
        return method

    def capabilities(self, method: str) -> RecipeCapabilities:
        """What ``method`` supports (no torch loaded)."""
        return self.hyperparameters[self.check(method)].capabilities

    def has_field(self, method: str, field: str) -> bool:
        """Whether ``method`` has the hyperparameter ``field``."""
        return field in {f.name for f in dataclasses.fields(self.hyperparameters[self.check(method)])}

    def recipe(self, method: str) -> Any:
        """The recipe module of ``method`` (imported on first use).

        Raises:
            InvalidRequestError: Unknown method.
        """
        return importlib.import_module(f"{self.package}.{self.check(method)}")

    def recipes(self) -> dict[str, Any]:
        """Every recipe module by method (imports them all)."""
        return {method: self.recipe(method) for method in self.hyperparameters}

    def module_getattr(self, module: str) -> Any:
        """A registry module's ``__getattr__`` serving ``RECIPES`` (:meth:`recipes`) on first use."""

        def __getattr__(name: str) -> Any:
            if name == "RECIPES":
                return self.recipes()
            raise AttributeError(f"module {module!r} has no attribute {name!r}")

        return __getattr__
