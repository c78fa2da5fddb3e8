"""DreamBooth: the whole UNet (and optionally the text encoder) fine-tuned on a subject's images.

As diffusers' ``examples/dreambooth/train_dreambooth.py``: every image is
paired with the instance prompt; all UNet weights train (in float32 even under
mixed precision, as the script requires); with ``train_text_encoder`` the text
encoder's too. With a ``class_prompt`` the trainer adds generated class images
(prior preservation).

Artefact (paths relative to a pipeline directory)::

    unet/config.json
    unet/diffusion_pytorch_model.safetensors
    text_encoder/config.json            # with train_text_encoder only
    text_encoder/model.safetensors      # with train_text_encoder only
    text_encoder_2/...                  # SDXL with train_text_encoder: both text encoders train

VAE, tokenizer and scheduler are the base model's and are not repeated: the
serving engine builds the fine-tuned pipeline around the base's components.
"""

from __future__ import annotations

from typing import Any

import torch

from appliance.diffusion import artifacts
from appliance.diffusion.data import ImageDataset, ImageDatasetError
from appliance.diffusion.hyperparameters import DreamBoothHyperparameters
from appliance.diffusion.protocol import Models, Setup

method = "dreambooth"
capabilities = DreamBoothHyperparameters.capabilities


def prompts(dataset: ImageDataset, instance_prompt: str | None) -> list[str]:
    """The instance prompt for every image."""
    if not instance_prompt:
        raise ImageDatasetError(
            "DreamBooth needs an instance prompt naming the subject (e.g. 'a photo of sks dog'): none was given "
            f"with the dataset; set `method.{method}.hyperparameters.instance_prompt`",
            param=f"method.{method}.hyperparameters.instance_prompt",
        )
    return [instance_prompt] * len(dataset.images)


def setup(models: Models, hp: DreamBoothHyperparameters, weight_dtype: torch.dtype) -> Setup:
    """Train every UNet weight (float32); the text encoder too, or cast it to ``weight_dtype`` and freeze it."""
    # The models arrive in float32; only a frozen text encoder is cast (the script's weight_dtype).
    models.unet.requires_grad_(True)
    encoders = models.text_encoders()
    for encoder in encoders.values():
        encoder.requires_grad_(hp.train_text_encoder)
        if not hp.train_text_encoder and weight_dtype != torch.float32:
            encoder.to(dtype=weight_dtype)
    trained = {"unet": models.unet, **(encoders if hp.train_text_encoder else {})}
    trainable = {f"{component}.{n}": p for component, part in trained.items() for n, p in part.named_parameters()}
    return Setup(trainable=trainable, train_text_encoder=hp.train_text_encoder,
                 details={"trained_components": list(trained)})


def save(models: Models, setup: Setup) -> dict[str, bytes]:
    tensors = {name: p for name, p in setup.trainable.items()}
    return artifacts_from_checkpoint(checkpoint_payload(models, setup), tensors)


def checkpoint_payload(models: Models, setup: Setup) -> dict[str, Any]:
    payload = {"unet_config": models.unet.to_json_string()}
    if setup.train_text_encoder:
        for component, encoder in models.text_encoders().items():
            payload[f"{component}_config"] = encoder.config.to_json_string()
    return payload


def artifacts_from_checkpoint(payload: dict[str, Any], trainable: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The diffusers-layout files from the trained tensors (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``)."""
    files = artifacts.model_files(
        "unet", payload["unet_config"], _component(trainable, "unet"), diffusers_model=True
    )
    for component in ("text_encoder", "text_encoder_2"):
        if f"{component}_config" in payload:
            files.update(artifacts.model_files(
                component, payload[f"{component}_config"], _component(trainable, component), diffusers_model=False,
            ))
    return files


def _component(trainable: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    cut = len(prefix) + 1
    return {name[cut:]: t for name, t in trainable.items() if name.startswith(prefix + ".")}


