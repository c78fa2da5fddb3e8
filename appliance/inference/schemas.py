"""Request bodies of the inference routes, as the OpenAPI document shows them.

The handlers check the JSON object themselves (their messages name each field);
these structs say what they read. Fields not listed are ignored, as OpenAI's
are. Chat and text completions are documented by the request structs of
:mod:`serving.protocol`, which parse them; the runtime-LoRA bodies by
:mod:`serving.requests`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from serving import protocol
from serving.requests import LoadLoraAdapterRequest, UnloadLoraAdapterRequest

__all__ = ["ChatCompletionBody", "CompletionBody", "ImageGenerationRequest", "LoadLoraAdapterRequest",
           "UnloadLoraAdapterRequest"]


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


class ImageGenerationRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/images/generations`` (OpenAI's shape, plus the diffusion settings)."""

    prompt: Annotated[str, msgspec.Meta(min_length=1, description="What to draw (not blank).")]
    model: Annotated[str, msgspec.Meta(min_length=1, description="An image model or a fine-tune of one.")]
    n: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
    size: Annotated[str, msgspec.Meta(description='"WxH", e.g. "512x512"; the model\'s own size when absent.')] \
        | None = None
    response_format: Annotated[Literal["b64_json"], msgspec.Meta(
        description="Only b64_json: images are never left on disk for a URL.")] = "b64_json"
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
