"""The small protocol each training recipe implements.

A recipe decides how the model is loaded and adapted (precision, quantisation,
activation checkpointing) and how the adapter is saved; the loop in
:mod:`appliance.training.trainer` does the rest, identically for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel

from appliance.trainkit.registry import RecipeCapabilities


@dataclass
class Setup:
    """A model ready to train.

    Attributes:
        model: The base model with LoRA layers; only LoRA parameters require grad.
        device: Where it lives.
        autocast_dtype: Dtype for ``torch.autocast`` around forward passes, or ``None``.
        details: What the recipe chose, for the result (e.g. ``{"compute_dtype": "float32"}``).
    """

    model: PeftModel
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Recipe(Protocol):
    """A training method; ``recipes/<method>.py`` modules implement it."""

    method: str
    #: What the method supports (DP, FSDP) and makes (``adapter`` or ``full_weights``); the same
    #: object as its hyperparameters class declares, so it can be read without loading the recipe.
    capabilities: RecipeCapabilities

    def setup(self, model_dir: Path, hp: Any, device: torch.device,
              shard: Callable[[torch.nn.Module], None] | None = None) -> Setup:
        """Load the base model from ``model_dir`` and attach LoRA per resolved ``hp``.

        ``shard`` is given only to recipes whose capabilities say ``supports_fsdp``, in a
        sharded run: the recipe calls it with the causal LM (adapter attached) before
        loading the weights, and then loads only this rank's shards.
        """
        ...

    def save(self, setup: Setup, base_model_name: str) -> dict[str, bytes]:
        """The trained adapter as ``{filename: bytes}`` of a PEFT directory."""
        ...
