"""Attaching LoRA layers, and writing the adapter as a standard PEFT directory, in memory.

vLLM refuses adapters with ``modules_to_save`` or LoRA on the output head or
the embeddings, so :func:`attach_lora` never creates them and
:func:`adapter_files` refuses to write one that has them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save as safetensors_save

from appliance.errors import InvalidRequestError
from appliance.modelstore.architectures import FORBIDDEN_TARGET_MODULES
from appliance.trainkit.checkpoint import full

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def attach_lora(causal_lm: torch.nn.Module, hp: Any) -> PeftModel:
    """Wrap ``causal_lm`` with LoRA on ``hp.target_modules`` (resolved hyperparameters).

    Raises:
        InvalidRequestError: A target matches no linear layer, or matches an
            embedding or the output head.
    """
    check_target_modules(causal_lm, hp.target_modules, param=f"method.{hp.method}.hyperparameters.target_modules")
    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=None,
    )
    model = get_peft_model(causal_lm, config)
    check_servable(model)
    return model


def check_target_modules(causal_lm: torch.nn.Module, targets: Sequence[str], *, param: str) -> None:
    """Each target must name (by suffix, as peft matches) linear layers only, never embeddings or the head."""
    excluded = {id(m) for m in (causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()) if m is not None}
    linear_names = sorted(
        {name.rsplit(".", 1)[-1] for name, m in causal_lm.named_modules() if isinstance(m, torch.nn.Linear)}
        - FORBIDDEN_TARGET_MODULES
    )
    problems = []
    for i, target in enumerate(targets):
        matches = [m for name, m in causal_lm.named_modules() if name == target or name.endswith("." + target)]
        if not matches:
            problems.append(f"{param}[{i}]: matches no layer of this model; got {target!r} (its linear layers: "
                            f"{', '.join(linear_names)})")
        elif any(id(m) in excluded for m in matches):
            problems.append(f"{param}[{i}]: names an embedding or the output head, which vLLM refuses; got {target!r}")
        elif not all(isinstance(m, torch.nn.Linear) for m in matches):
            problems.append(f"{param}[{i}]: must name linear layers; got {target!r}")
    if problems:
        raise InvalidRequestError("; ".join(problems), param=param)


def check_servable(model: PeftModel) -> None:
    """Refuse adapters that vLLM would refuse (a bug if it ever fires: targets are checked first)."""
    for name, config in model.peft_config.items():
        if getattr(config, "modules_to_save", None):
            raise RuntimeError(f"adapter {name!r} has modules_to_save {config.modules_to_save!r}")
    for name, _ in model.named_parameters():
        if "lora_" in name and any(f".{bad}." in name for bad in FORBIDDEN_TARGET_MODULES):
            raise RuntimeError(f"LoRA weights on an embedding or the output head: {name}")


def adapter_files(model: PeftModel, base_model_name: str) -> dict[str, bytes]:
    """The adapter as ``{filename: bytes}``, the files ``PeftModel.save_pretrained`` would write.

    Written out to a directory, they load with stock ``PeftModel.from_pretrained``.
    """
    check_servable(model)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    unexpected = [k for k in state if "lora_A" not in k and "lora_B" not in k]
    if unexpected:
        raise RuntimeError(f"adapter holds non-LoRA tensors: {unexpected[:5]}")
    # Whole tensors (a sharded model's state dict holds this rank's shards: gathering is a collective).
    tensors = {k: full(v).contiguous() for k, v in state.items()}
    weights = safetensors_save(tensors, metadata={"format": "pt"})

    config = model.peft_config["default"].to_dict()
    config["inference_mode"] = True
    config["base_model_name_or_path"] = base_model_name
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    buf = io.StringIO()
    json.dump(config, buf, indent=2, sort_keys=True)
    return {ADAPTER_CONFIG: buf.getvalue().encode(), ADAPTER_WEIGHTS: weights}
