"""QLoRA: LoRA on a base model quantised to 4-bit NF4 with double quantisation.

bitsandbytes quantises every linear layer but the output head while loading;
the compute dtype is float32 on CPU and bfloat16 on CUDA (with autocast around
the forward pass). ``prepare_model_for_kbit_training`` keeps the remaining
weights in float32 and turns on activation checkpointing, as the QLoRA paper
does: memory, not speed, is the point of this recipe.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from appliance.training.adapter import adapter_files, attach_lora
from appliance.training.hyperparameters import QloraHyperparameters
from appliance.training.packing import packed_attention
from appliance.training.protocol import Setup

method = "qlora"
capabilities = QloraHyperparameters.capabilities


def setup(model_dir: Path, hp: QloraHyperparameters, device: torch.device) -> Setup:
    """Load the base model in 4-bit NF4 (double quantisation) and attach LoRA."""
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization,
        dtype=compute_dtype,
        device_map={"": device},
        attn_implementation=packed_attention(device, compute_dtype),
        local_files_only=True,
    )
    base.config.use_cache = False
    # bitsandbytes repacks 4-bit weights for an AVX512-BF16 inference kernel the
    # first time a layer runs in eval mode on CPU, and never packs them back: the
    # training steps after an evaluation would then run through a kernel with no
    # autograd support and silently lose gradients. Keep the trainable layout.
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    base = prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if device.type == "cpu":
        _release_checkpoint_mapping(base)
    model = attach_lora(base, hp)
    return Setup(
        model=model,
        device=device,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        details={"quantization": "nf4-double", "compute_dtype": str(compute_dtype)[6:], "gradient_checkpointing": True},
    )


def _release_checkpoint_mapping(model: torch.nn.Module) -> None:
    """Give the weights that stayed unquantised storage of their own.

    On a CPU they load zero-copy from the checkpoint's memory map, which keeps
    the whole mapped file resident after quantisation has read every page of it
    (measured: 405 MiB of a 540 MiB checkpoint for a 135M model, a resident set
    about 2.5x what training needs). A copy of the few weights that stay fp32
    (embeddings, norms) lets the mapping go.
    """
    with torch.no_grad():
        for param in model.parameters():
            if not isinstance(param, bnb.nn.Params4bit):
                param.data = param.data.clone()


def save(setup: Setup, base_model_name: str) -> dict[str, bytes]:
    """The LoRA adapter as PEFT files (it applies to the full-precision base as well)."""
    return adapter_files(setup.model, base_model_name)
