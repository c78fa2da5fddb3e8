"""Request bodies of the OpenAI/vLLM routes, as the OpenAPI documents show them.

The handlers (``serving.vllm_server`` and the appliance's
``appliance.inference.controllers``) check what they receive themselves: chat
and text completions with :mod:`serving.protocol`'s parsers, the runtime-LoRA
bodies with vLLM's messages and error shape. These structs say what they read;
fields not listed are ignored, as vLLM ignores them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from serving import protocol


def _as_sent(model: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """``model`` as a client sends it: its fields less ``ignored_fields`` (which the parser fills in)."""
    fields = []
    for f in msgspec.structs.fields(model):
        if f.name == "ignored_fields":
            continue
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, f.type))
    return msgspec.defstruct(model.__name__, fields, kw_only=True, module=__name__)


#: ``POST /v1/chat/completions`` and ``POST /v1/completions`` as documented: the fields that
#: :func:`serving.protocol.parse_chat_request` and :func:`~serving.protocol.parse_completion_request` read.
ChatCompletionBody = _as_sent(protocol.ChatCompletionRequest)
CompletionBody = _as_sent(protocol.CompletionRequest)


class LoadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/load_lora_adapter``: serve the PEFT adapter directory ``lora_path`` as model ``lora_name``."""

    lora_name: Annotated[str, msgspec.Meta(description="The model name the adapter answers to.")]
    lora_path: Annotated[str, msgspec.Meta(description="A PEFT adapter directory on the serving host.")]
    load_inplace: Annotated[bool, msgspec.Meta(description="vLLM's option; accepted and ignored here.")] = False


class UnloadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/unload_lora_adapter``: stop serving the adapter ``lora_name``."""

    lora_name: str
    lora_int_id: Annotated[int | None, msgspec.Meta(description="vLLM's option; accepted and ignored here.")] = None
