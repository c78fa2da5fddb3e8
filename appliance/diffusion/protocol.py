"""The small protocol each image training recipe implements.

A recipe decides which images pair with which prompts, what is trained (LoRA
layers or whole models) and what the artefact looks like; the loop in
:mod:`appliance.diffusion.trainer` does the rest (noise, loss, prior
preservation, Min-SNR weighting, checkpoints, validation) identically for
every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from appliance.diffusion.data import ImageDataset
from appliance.trainkit.registry import RecipeCapabilities


@dataclass
class Models:
    """The base pipeline's parts, loaded for training (float32, on the training device).

    Attributes:
        unet: ``UNet2DConditionModel``.
        vae: ``AutoencoderKL`` (frozen).
        text_encoder: ``CLIPTextModel``.
        tokenizer: ``CLIPTokenizer``.
        noise_scheduler: A ``DDPMScheduler`` built from the pipeline's scheduler config (training noise).
        sample_scheduler: The pipeline's own scheduler (sampling).
        text_encoder_2: SDXL only: ``CLIPTextModelWithProjection`` (its pooled, projected output
            conditions the UNet with the ``add_time_ids``); ``None`` for SD 1.x/2.x.
        tokenizer_2: SDXL only: its tokenizer.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    sample_scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def xl(self) -> bool:
        """Whether this is an SDXL pipeline (two text encoders, ``text_time`` conditioning)."""
        return self.text_encoder_2 is not None

    def text_encoders(self) -> dict[str, Any]:
        """``{"text_encoder": ..., "text_encoder_2": ...}``: the pipeline's text encoders by component name."""
        return {"text_encoder": self.text_encoder, **({"text_encoder_2": self.text_encoder_2} if self.xl else {})}


@dataclass
class Setup:
    """What a recipe made trainable.

    Attributes:
        trainable: ``"unet.<name>"`` / ``"text_encoder.<name>"`` (/ ``"text_encoder_2.<name>"``) to each
            parameter that requires grad.
        train_text_encoder: Whether the text encoder(s) are in the graph (prompts are then encoded every step).
        details: What the recipe chose, for the result.
    """

    trainable: dict[str, torch.nn.Parameter]
    train_text_encoder: bool
    details: dict[str, Any] = field(default_factory=dict)


class Recipe(Protocol):
    """An image training method; ``recipes/<method>.py`` modules implement it."""

    method: str
    #: What the method supports (DP, FSDP) and makes (``adapter`` or ``full_weights``); the same
    #: object as its hyperparameters class declares, so it can be read without loading the recipe.
    capabilities: RecipeCapabilities

    def prompts(self, dataset: ImageDataset, instance_prompt: str | None) -> list[str]:
        """The prompt each training image is paired with (raises naming what is missing)."""
        ...

    def setup(self, models: Models, hp: Any, weight_dtype: torch.dtype) -> Setup:
        """Make ``models`` trainable per resolved ``hp``; frozen weights may be cast to ``weight_dtype``."""
        ...

    def save(self, models: Models, setup: Setup) -> dict[str, bytes]:
        """The trained artefact as ``{file name: bytes}``."""
        ...

    def checkpoint_payload(self, models: Models, setup: Setup) -> dict[str, Any]:
        """What a checkpoint needs, besides the trainable tensors, to rebuild the artefact."""
        ...

    def artifacts_from_checkpoint(self, payload: dict[str, Any], trainable: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """The artefact a checkpoint holds, as :meth:`save` would have written it at that step."""
        ...
