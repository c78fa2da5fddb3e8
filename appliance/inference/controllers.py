"""``/v1/chat/completions``, ``/v1/completions`` and vLLM's runtime LoRA endpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.concurrency import sync_to_thread
from litestar.di import NamedDependency
from litestar.enums import MediaType
from litestar.params import JSONBody
from litestar.response import Stream

from appliance.audit.service import record
from appliance.errors import ConflictError, InvalidRequestError, NotFoundError
from appliance.identity.roles import Permission
from appliance.inference.schemas import (
    ChatCompletionBody,
    CompletionBody,
    ImageGenerationRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from appliance.inference.service import InferenceService
from appliance.web.context import audit_context
from appliance.web.openapi import ErrorBody, VllmErrorBody, error_responses, operation
from serving.bodies import documented_body
from serving.errors import AdapterLoadError, error_body
from serving.protocol import (
    chat_chunks,
    chat_completion,
    completion,
    completion_chunks,
    new_id,
    parse_chat_request,
    parse_completion_request,
    sse,
)


#: The bodies are documented by structs (``appliance.inference.schemas``) and parsed by ``serving.protocol``
#: from the bytes received; a streamed answer is server-sent events.
_STREAMING_OPERATION = operation(also_answers=("text/event-stream",))


class InferenceController(Controller):
    path = "/v1"
    tags = ["inference"]

    @post("/chat/completions", opt={"permission": Permission.INFERENCE}, status_code=200,
          responses=error_responses(413, 502, 503), operation_class=_STREAMING_OPERATION,
          dto=documented_body(ChatCompletionBody, raw=True), return_dto=None)
    async def chat_completions(self, request: Request, inference: NamedDependency[InferenceService],
                               data: JSONBody[bytes] = b"") -> Any:
        """OpenAI chat completions, streamed (server-sent events ending with `data: [DONE]`) or not.

        `model` is a base model or a fine-tuned `ft:` model of one of the caller's projects. The
        response passes the project's output guard; the request is audited as metadata only.
        """
        req = parse_chat_request(data)
        ctx = audit_context(request)
        if not req.stream:
            result = await sync_to_thread(inference.generate, request.user, ctx, req, "chat")
            return chat_completion(result).to_dict()
        stream = await sync_to_thread(inference.stream, request.user, ctx, req, "chat")
        chunks = chat_chunks(stream, model=req.model, n=req.n, include_usage=req.include_usage, id=new_id("chatcmpl"))
        return Stream(sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @post("/completions", opt={"permission": Permission.INFERENCE}, status_code=200,
          responses=error_responses(413, 502, 503), operation_class=_STREAMING_OPERATION,
          dto=documented_body(CompletionBody, raw=True), return_dto=None)
    async def completions(self, request: Request, inference: NamedDependency[InferenceService],
                          data: JSONBody[bytes] = b"") -> Any:
        """OpenAI (legacy) completions over a raw prompt."""
        req = parse_completion_request(data)
        ctx = audit_context(request)
        if not req.stream:
            result = await sync_to_thread(inference.generate, request.user, ctx, req, "completion")
            return completion(result).to_dict()
        stream = await sync_to_thread(inference.stream, request.user, ctx, req, "completion")
        chunks = completion_chunks(stream, model=req.model, include_usage=req.include_usage, id=new_id("cmpl"))
        return Stream(sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


class ImageController(Controller):
    path = "/v1/images"
    tags = ["inference"]

    @post("/generations", opt={"permission": Permission.INFERENCE}, status_code=200, responses=error_responses(502),
          sync_to_thread=True, dto=documented_body(ImageGenerationRequest), return_dto=None)
    def generations(self, request: Request, inference: NamedDependency[InferenceService],
                    data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        """OpenAI image generation: `model`, `prompt`, `n`, `size` ("WxH"), `response_format: b64_json`,
        plus `seed`, `num_inference_steps`, `guidance_scale`, `negative_prompt`."""
        import base64
        import time

        prompt, model = data.get("prompt"), data.get("model")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("`prompt` is required", param="prompt")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("`model` is required: an image model or a fine-tune of one", param="model")
        if data.get("response_format", "b64_json") != "b64_json":
            raise InvalidRequestError(
                f"`response_format` must be 'b64_json' (images are never left on disk for a URL); "
                f"got {data.get('response_format')!r}", param="response_format")
        n = data.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise InvalidRequestError(f"`n` must be an integer from 1 to 10; got {n!r}", param="n")
        images = inference.images(
            request.user, audit_context(request), model=model, prompt=prompt, n=n, size=data.get("size"),
            seed=data.get("seed"), num_inference_steps=data.get("num_inference_steps"),
            guidance_scale=data.get("guidance_scale"), negative_prompt=data.get("negative_prompt"))
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None} for png in images]}


#: Body validation fails in our shape, the operation itself in vLLM's.
_VLLM_ERRORS = error_responses(400, 404, body=ErrorBody | VllmErrorBody)


def _vllm_error(status: int, type_: str, message: str) -> Response:
    """An error in vLLM's dialect (the HTTP status as ``code``, vLLM's exception name as ``type``)."""
    return Response(error_body(status, message, None, type_), status_code=status, media_type=MediaType.JSON)


class RuntimeLoraController(Controller):
    """vLLM's runtime LoRA endpoints, same shapes, so a vLLM client can drive this server.

    Adapters published by jobs are loaded automatically; these are for operators
    (admin only) who load a PEFT directory present on the serving host.
    """

    path = "/v1"
    tags = ["serving-admin"]

    @post("/load_lora_adapter", opt={"permission": Permission.SERVING_ADMIN}, status_code=200,
          responses=_VLLM_ERRORS, media_type=MediaType.TEXT, sync_to_thread=True,
          dto=documented_body(LoadLoraAdapterRequest), return_dto=None)
    def load_lora_adapter(self, request: Request, inference: NamedDependency[InferenceService],
                          data: JSONBody[dict[str, Any]]) -> Response:
        name, path = data.get("lora_name"), data.get("lora_path")
        if not name or not path:
            return _vllm_error(400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
        if not isinstance(name, str) or not isinstance(path, str):
            return _vllm_error(400, "InvalidUserInput", "'lora_name' and 'lora_path' must be strings.")
        config = Path(path) / "adapter_config.json"
        if not config.is_file():
            return _vllm_error(404, "NotFoundError", f"No adapter found for {path}")
        try:
            adapter_config = json.loads(config.read_text())
            base = adapter_config.get("base_model_name_or_path") if isinstance(adapter_config, dict) else None
            base = base if isinstance(base, str) else ""
            base = Path(base).name or base
            engine = inference.engine_for(base)
        except (NotFoundError, ValueError):
            return _vllm_error(400, "BadRequestError",
                               f"Loading lora {name} failed: its base model is not in this appliance's catalogue")
        if engine.has_adapter(name):
            return _vllm_error(400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded.")
        try:
            inference.load_runtime_adapter(name, Path(path), base)
        except (AdapterLoadError, InvalidRequestError, ConflictError) as exc:
            return _vllm_error(400, "BadRequestError", f"Loading lora {name} failed: {exc.message}")
        with inference.db.transaction() as s:
            record(s, audit_context(request), "serving.load_adapter", resource_type="model", resource_id=name,
                   details={"path": str(path), "base_model": engine.base_model_name})
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    @post("/unload_lora_adapter", opt={"permission": Permission.SERVING_ADMIN}, status_code=200,
          responses=_VLLM_ERRORS, media_type=MediaType.TEXT, sync_to_thread=True,
          dto=documented_body(UnloadLoraAdapterRequest), return_dto=None)
    def unload_lora_adapter(self, request: Request, inference: NamedDependency[InferenceService],
                            data: JSONBody[dict[str, Any]]) -> Response:
        name = data.get("lora_name")
        if isinstance(name, str) and name and inference.unload_runtime_adapter(name):
            with inference.db.transaction() as s:
                record(s, audit_context(request), "serving.unload_adapter", resource_type="model", resource_id=name)
            return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")
        return _vllm_error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")

    @get("/serving/replicas", opt={"permission": Permission.SERVING_ADMIN}, sync_to_thread=False)
    def serving_replicas(self, inference: NamedDependency[InferenceService]) -> dict[str, Any]:
        """The vLLM serving replicas of each running engine: up or not, requests outstanding and sent, last error.

        Empty under the embedded engine (`APPLIANCE_SERVING_ENGINE=transformers`).
        """
        data = [{"base_model": base, **replica} for base, replicas in inference.replica_status().items()
                for replica in replicas]
        return {"object": "list", "data": data}
