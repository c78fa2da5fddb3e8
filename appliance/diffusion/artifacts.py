"""Artefact files in diffusers' own formats, built in memory.

* LoRA: ``pytorch_lora_weights.safetensors`` with ``unet.``/``text_encoder.``
  prefixed peft keys (``...to_q.lora_A.weight``) and the LoRA configs as
  ``lora_adapter_metadata``, byte for byte what
  ``StableDiffusionLoraLoaderMixin.save_lora_weights`` writes, so stock
  ``pipe.load_lora_weights(dir)`` loads it.
* Whole models: ``<component>/config.json`` plus
  ``<component>/diffusion_pytorch_model.safetensors`` (diffusers models) or
  ``<component>/model.safetensors`` (transformers models), as ``save_pretrained`` lays them out.
"""

from __future__ import annotations

import json
from typing import Any

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_file(layers: dict[str, dict[str, torch.Tensor]], configs: dict[str, dict[str, Any]]) -> bytes:
    """``pytorch_lora_weights.safetensors`` from ``{component: diffusers-format LoRA state dict}``."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for component, state in layers.items():
        tensors.update({f"{component}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()})
    metadata = {"format": "pt"}
    packed: dict[str, Any] = {}
    for component, config in configs.items():
        packed.update({f"{component}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()})
    if packed:
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True, default=str)
    return save(tensors, metadata=metadata)


def lora_layers(model: Any) -> dict[str, torch.Tensor]:
    """A peft-adapted model's LoRA weights in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def lora_config(model: Any) -> dict[str, Any]:
    return model.peft_config["default"].to_dict()


def model_files(component: str, config_json: str, state: dict[str, torch.Tensor], *, diffusers_model: bool) -> dict[str, bytes]:
    """``{component}/config.json`` and its safetensors weights."""
    from safetensors.torch import save

    weights = "diffusion_pytorch_model.safetensors" if diffusers_model else "model.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return {
        f"{component}/config.json": config_json.encode(),
        f"{component}/{weights}": save(tensors, metadata={"format": "pt"}),
    }
