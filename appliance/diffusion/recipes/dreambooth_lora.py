"""DreamBooth with LoRA: a subject learnt from a few images into a LoRA, optionally with prior preservation.

As diffusers' ``examples/dreambooth/train_dreambooth_lora.py``: every image is
paired with the instance prompt (captions are ignored: the rare identifier in
the prompt is what binds the subject); the LoRA (``r = lora_alpha = rank``,
Gaussian init) covers ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``add_k_proj``,
``add_v_proj`` (the last two exist only in some UNets) and, with
``train_text_encoder``, the text encoder's attention projections. With a
``class_prompt`` the trainer adds generated class images (prior preservation).
The artefact is ``pytorch_lora_weights.safetensors`` in diffusers' format.

The LoRA plumbing is the ``lora`` recipe's; the two differ in what pairs with
what and which modules are targeted.
"""

from __future__ import annotations

from typing import Any

import torch

from appliance.diffusion.data import ImageDataset, ImageDatasetError
from appliance.diffusion.hyperparameters import DreamBoothLoraHyperparameters
from appliance.diffusion.protocol import Models, Setup
from appliance.diffusion.recipes.lora import attach_lora, save_lora

method = "dreambooth_lora"
capabilities = DreamBoothLoraHyperparameters.capabilities
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def prompts(dataset: ImageDataset, instance_prompt: str | None) -> list[str]:
    """The instance prompt for every image."""
    if not instance_prompt:
        raise ImageDatasetError(
            "DreamBooth needs an instance prompt naming the subject (e.g. 'a photo of sks dog'): none was given "
            f"with the dataset; set `method.{method}.hyperparameters.instance_prompt`",
            param=f"method.{method}.hyperparameters.instance_prompt",
        )
    return [instance_prompt] * len(dataset.images)


def setup(models: Models, hp: DreamBoothLoraHyperparameters, weight_dtype: torch.dtype) -> Setup:
    return attach_lora(models, hp.rank, hp.train_text_encoder, weight_dtype, UNET_TARGETS, method)


def save(models: Models, setup: Setup) -> dict[str, bytes]:
    return save_lora(models, setup)


def checkpoint_payload(models: Models, setup: Setup) -> dict[str, Any]:
    return {"artifacts": save_lora(models, setup)}


def artifacts_from_checkpoint(payload: dict[str, Any], trainable: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return dict(payload["artifacts"])
