"""LoRA on a Stable Diffusion UNet's attention projections, trained on captioned images.

As diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: a peft
LoRA (``r = lora_alpha = rank``, Gaussian init) on ``to_q``, ``to_k``, ``to_v``
and ``to_out.0`` of every attention block; with ``train_text_encoder`` another on
the text encoder's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (on SDXL, on both text
encoders, as ``train_text_to_image_lora_sdxl.py`` does). Each image is
paired with its caption, or with the instance prompt when it has none. The
artefact is ``pytorch_lora_weights.safetensors`` in diffusers' format.
"""

from __future__ import annotations

from typing import Any

import torch

from appliance.diffusion import artifacts
from appliance.diffusion.compat import text_encoder_lora_supported
from appliance.diffusion.data import ImageDataset, ImageDatasetError
from appliance.diffusion.hyperparameters import ImageLoraHyperparameters
from appliance.diffusion.protocol import Models, Setup
from appliance.errors import InvalidRequestError

method = "lora"
capabilities = ImageLoraHyperparameters.capabilities
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def prompts(dataset: ImageDataset, instance_prompt: str | None) -> list[str]:
    """Each image's caption, else the instance prompt."""
    out = [caption.strip() or (instance_prompt or "") for caption in dataset.captions]
    missing = [name for name, prompt in zip(dataset.names, out, strict=True) if not prompt]
    if missing:
        raise ImageDatasetError(
            f"{len(missing)} image(s) have no caption and there is no instance prompt (first: {missing[0]}); "
            f"caption every image or set `method.{method}.hyperparameters.instance_prompt`",
            param=f"method.{method}.hyperparameters.instance_prompt",
        )
    return out


def setup(models: Models, hp: ImageLoraHyperparameters, weight_dtype: torch.dtype) -> Setup:
    """Freeze the base (cast to ``weight_dtype``) and attach float32 LoRA layers."""
    return attach_lora(models, hp.rank, hp.train_text_encoder, weight_dtype, UNET_TARGETS)


def save(models: Models, setup: Setup) -> dict[str, bytes]:
    return save_lora(models, setup)


def checkpoint_payload(models: Models, setup: Setup) -> dict[str, Any]:
    return {"artifacts": save_lora(models, setup)}


def artifacts_from_checkpoint(payload: dict[str, Any], trainable: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return dict(payload["artifacts"])


def attach_lora(models: Models, rank: int, train_text_encoder: bool, weight_dtype: torch.dtype,
                unet_targets: list[str], method: str = method) -> Setup:
    """Frozen base, LoRA on the UNet (and text encoder): the scripts' ``LoraConfig`` and dtype handling."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    encoders = models.text_encoders()
    for part in (models.unet, *encoders.values()):
        part.requires_grad_(False)
        if weight_dtype != torch.float32:
            part.to(dtype=weight_dtype)
    models.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=unet_targets)
    )
    if train_text_encoder:
        supported, why = text_encoder_lora_supported()
        if not supported:
            raise InvalidRequestError(
                f"`train_text_encoder` with LoRA is not available on this appliance: {why}; set it to false",
                param=f"method.{method}.hyperparameters.train_text_encoder")
        for encoder in encoders.values():
            encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=TEXT_ENCODER_TARGETS))
    trained = {"unet": models.unet, **(encoders if train_text_encoder else {})}
    cast_training_params(list(trained.values()), dtype=torch.float32)
    trainable = {f"{component}.{n}": p for component, part in trained.items()
                 for n, p in part.named_parameters() if p.requires_grad}
    return Setup(
        trainable=trainable,
        train_text_encoder=train_text_encoder,
        details={"lora_rank": rank, "lora_alpha": rank, "unet_target_modules": list(unet_targets),
                 "text_encoder_target_modules": TEXT_ENCODER_TARGETS if train_text_encoder else []},
    )


def save_lora(models: Models, setup: Setup) -> dict[str, bytes]:
    """``pytorch_lora_weights.safetensors`` with the UNet (and text encoders') LoRA, keys prefixed ``unet.``,
    ``text_encoder.`` and, on SDXL, ``text_encoder_2.`` (what ``StableDiffusionXLPipeline.save_lora_weights``
    writes)."""
    parts = {"unet": models.unet, **(models.text_encoders() if setup.train_text_encoder else {})}
    layers = {component: artifacts.lora_layers(part) for component, part in parts.items()}
    configs = {component: artifacts.lora_config(part) for component, part in parts.items()}
    return {artifacts.LORA_WEIGHTS: artifacts.lora_file(layers, configs)}
