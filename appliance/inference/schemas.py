"""Request bodies of the inference routes, as the OpenAPI document shows them.

The handlers check the JSON object themselves (their messages name each field);
these structs say what they read. Fields not listed are ignored, as OpenAI's
are. Chat and text completions, parsed by :mod:`serving.protocol`, and the
runtime-LoRA bodies are documented by the structs of :mod:`serving.requests`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from serving.requests import ChatCompletionBody, CompletionBody, LoadLoraAdapterRequest, UnloadLoraAdapterRequest

__all__ = ["ChatCompletionBody", "CompletionBody", "ImageGenerationRequest", "LoadLoraAdapterRequest",
           "UnloadLoraAdapterRequest"]


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
