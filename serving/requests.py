"""Bodies of vLLM's runtime-LoRA endpoints, as the OpenAPI documents show them.

The handlers (``serving.vllm_server`` and the appliance's
``appliance.inference.controllers``) check the JSON object themselves, so that
they answer exactly as vLLM does (its messages and its error shape); these
structs say what they read. Fields not listed are ignored, as vLLM ignores them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec


class LoadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/load_lora_adapter``: serve the PEFT adapter directory ``lora_path`` as model ``lora_name``."""

    lora_name: Annotated[str, msgspec.Meta(description="The model name the adapter answers to.")]
    lora_path: Annotated[str, msgspec.Meta(description="A PEFT adapter directory on the serving host.")]
    load_inplace: Annotated[bool, msgspec.Meta(description="vLLM's option; accepted and ignored here.")] = False


class UnloadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/unload_lora_adapter``: stop serving the adapter ``lora_name``."""

    lora_name: str
    lora_int_id: Annotated[int | None, msgspec.Meta(description="vLLM's option; accepted and ignored here.")] = None
