"""LoRA on a full-precision base model.

The base model is loaded in float32 or bfloat16 (``precision``); LoRA weights
stay float32 (peft keeps adapter weights in float32 by default). The weights
load straight onto the device in that dtype (``device_map``), never through
an fp32 copy on the host. Activation checkpointing (non-reentrant, per decoder
layer) is on when ``hp.gradient_checkpointing`` says so: the memory plan turns
it on when a micro-batch would not fit without it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from appliance.training.adapter import adapter_files, attach_lora
from appliance.training.hyperparameters import LoraHyperparameters
from appliance.training.packing import packed_attention
from appliance.training.protocol import Setup

method = "lora"
capabilities = LoraHyperparameters.capabilities


def setup(model_dir: Path, hp: LoraHyperparameters, device: torch.device) -> Setup:
    """Load the base model in ``hp.precision`` and attach LoRA to ``hp.target_modules``."""
    dtype = torch.bfloat16 if hp.precision == "bf16" else torch.float32
    attention = packed_attention(device, dtype)
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attention, local_files_only=True, device_map={"": device}
    )
    base.config.use_cache = False
    checkpointing = hp.gradient_checkpointing is True
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(base, hp)
    return Setup(model=model, device=device, details={"precision": hp.precision, "base_dtype": str(dtype)[6:],
                                                      "gradient_checkpointing": checkpointing})


def save(setup: Setup, base_model_name: str) -> dict[str, bytes]:
    """The LoRA adapter as PEFT files."""
    return adapter_files(setup.model, base_model_name)
