"""LoRA on a full-precision base model.

The base model is loaded in float32 or bfloat16 (``precision``); LoRA weights
stay float32 (peft keeps adapter weights in float32 by default). The weights
load straight onto the device in that dtype (``device_map``), never through
an fp32 copy on the host. Activation checkpointing (non-reentrant, per decoder
layer) is on when ``hp.gradient_checkpointing`` says so: the memory plan turns
it on when a micro-batch would not fit without it.

Sharded (FSDP), no rank loads the whole model: it is built on the meta
device, the adapter attached and the decoder layers sharded there, and each
rank then reads only its rows of each sharded weight
(:mod:`appliance.training.sharded_load`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from appliance.training.adapter import adapter_files, attach_lora
from appliance.training.hyperparameters import LoraHyperparameters
from appliance.training.packing import packed_attention
from appliance.training.protocol import Setup
from appliance.training.sharded_load import empty_causal_lm, materialise, stand_in_weights

method = "lora"
capabilities = LoraHyperparameters.capabilities


def setup(model_dir: Path, hp: LoraHyperparameters, device: torch.device,
          shard: Callable[[torch.nn.Module], None] | None = None) -> Setup:
    """Load the base model in ``hp.precision`` and attach LoRA to ``hp.target_modules``.

    With ``shard``, the base model is sharded over the ranks (``shard`` is called with the
    causal LM, adapter attached, still on the meta device) and each rank loads its shards only.
    """
    dtype = torch.bfloat16 if hp.precision == "bf16" else torch.float32
    attention = packed_attention(device, dtype)
    if shard is None:
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation=attention, local_files_only=True, device_map={"": device}
        )
    else:
        base = empty_causal_lm(model_dir, dtype, attention)
    base.config.use_cache = False
    checkpointing = hp.gradient_checkpointing is True
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if shard is None:
        model = attach_lora(base, hp)
    else:
        with stand_in_weights(base):  # the adapter initialised on the CPU, as on a loaded model
            model = attach_lora(base, hp)
        adapter = {name: p.detach().clone() for name, p in base.named_parameters() if not p.is_meta}
        shard(base)
        materialise(base, model_dir, device, adapter)
    return Setup(model=model, device=device, details={"precision": hp.precision, "base_dtype": str(dtype)[6:],
                                                      "gradient_checkpointing": checkpointing})


def save(setup: Setup, base_model_name: str) -> dict[str, bytes]:
    """The LoRA adapter as PEFT files."""
    return adapter_files(setup.model, base_model_name)
