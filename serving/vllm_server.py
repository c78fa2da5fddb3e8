"""A small vLLM-compatible OpenAI server over any engine: tests, demos and CPU serving replicas.

It exposes what :class:`~serving.vllm_engine.VllmEngine` uses of a real vLLM
server started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``,
with vLLM's request and response shapes and status codes:

- ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` -> 200 text; 400 when the
  name is taken; 404 when the path holds no adapter; 500 ``InternalServerError`` when the
  adapter fails to load (as vLLM >= 0.20 answers; earlier releases said 400).
- ``POST /v1/unload_lora_adapter {"lora_name"}`` -> 200 text; 404 for an unknown name. Like
  vLLM (issues 42633, 54839), an unloaded adapter's weights stay in the server's memory, in an
  LRU of ``max_cpu_loras`` adapters: only a restart forgets them.
- ``GET /v1/models`` (base card with ``max_model_len``; adapters with ``root`` and ``parent``).
- ``POST /v1/chat/completions`` and ``/v1/completions``, streaming as server-sent events.
- ``GET /health``, and ``GET /metrics`` with vLLM's ``vllm:request_success_total`` counter,
  labelled as vLLM labels it: by the served base model's name, whatever adapter was asked for.

The real vLLM is what the suite tests the vLLM engine against (``tests/vllm_helpers.py``); this
server stays where a fault must be injected (a replica killed mid-request, a server that forgot
its adapters) and as ``appliance serve-engine``, CPU serving replicas without vLLM.

Errors are ``{"error": {"message", "type", "param", "code"}}``, built by
:func:`serving.errors.error_body` in vLLM's dialect (the status as ``code``). With ``api_key``
every ``/v1`` request must carry it as a bearer token (vLLM's ``--api-key``: 401
otherwise); without, bind it to loopback only. :func:`serve_in_thread` runs it
under uvicorn in a thread; ``appliance serve-engine`` runs it as a process (a
serving replica the appliance drives like ``vllm serve``).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
from litestar import Litestar, Request, Response, get, post
from litestar.params import JSONBody
from litestar.response import Stream

from serving.adapters import ADAPTER_CONFIG
from serving.bodies import documented_body
from serving.engine import TextEngine
from serving.errors import (
    AdapterLoadError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServingError,
    error_body,
    unauthorized_body,
)
from serving.requests import ChatCompletionBody, CompletionBody, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
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

__all__ = ["create_vllm_compatible_app", "serve_in_thread"]


def _error(status: int, type_: str, message: str, param: str | None = None) -> Response[Any]:
    """An error in vLLM's dialect: the HTTP status as ``code``, vLLM's exception name as ``type``."""
    return Response(error_body(status, message, param, type_), status_code=status)


def _on_error(_: Request, exc: Exception) -> Response[Any]:
    if isinstance(exc, NotFoundError):
        return _error(404, "NotFoundError", exc.message, exc.param)
    if isinstance(exc, (InvalidRequestError, AdapterLoadError, ConflictError)):
        return _error(400, "BadRequestError", exc.message, exc.param)
    if isinstance(exc, ServingError):
        return _error(500, "InternalServerError", exc.message, exc.param)
    return _error(500, "InternalServerError", f"{type(exc).__name__}: {exc}")


def create_vllm_compatible_app(engine: TextEngine, *, api_key: str | None = None,
                               max_cpu_loras: int = 4) -> Litestar:
    """A litestar app answering like ``vllm serve --enable-lora [--api-key KEY]`` for ``engine``."""
    roots: dict[str, str] = {}
    created = int(time.time())
    served: dict[str, int] = {}  # served base model name -> requests answered
    #: What vLLM keeps of unloaded adapters (its CPU LoRA cache): name -> weights, oldest first.
    retained: OrderedDict[str, bytes] = OrderedDict()

    def count(_model: str) -> None:
        base = engine.base_model_name
        served[base] = served.get(base, 0) + 1
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check_key(request: Request) -> Response[Any] | None:
        if expected is None or not request.url.path.startswith("/v1"):
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return None
        return Response(unauthorized_body(), status_code=401)

    # The bodies are the JSON objects the structs document, checked here with vLLM's messages.
    @post("/v1/load_lora_adapter", status_code=200, dto=documented_body(LoadLoraAdapterRequest), return_dto=None)
    async def load_lora_adapter(data: JSONBody[dict[str, Any]]) -> Response[Any]:
        name, path = data.get("lora_name"), data.get("lora_path")
        if not name or not path:
            return _error(400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
        if engine.has_adapter(name):
            return _error(400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded.")
        if not (Path(path) / ADAPTER_CONFIG).is_file():
            return _error(404, "NotFoundError", f"No adapter found for {path}")
        try:
            await anyio.to_thread.run_sync(engine.load_adapter, name, Path(path))
        except (AdapterLoadError, InvalidRequestError) as exc:
            return _error(500, "InternalServerError", f"Loading lora {name} failed: {exc.message}")
        roots[name] = path
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    @post("/v1/unload_lora_adapter", status_code=200, dto=documented_body(UnloadLoraAdapterRequest), return_dto=None)
    async def unload_lora_adapter(data: JSONBody[dict[str, Any]]) -> Response[Any]:
        name = data.get("lora_name")
        if not name or not engine.has_adapter(name):
            return _error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        path = roots.pop(name, None)
        await anyio.to_thread.run_sync(engine.unload_adapter, name)
        weights = Path(path or "") / "adapter_model.safetensors"
        if path and weights.is_file():  # vLLM keeps them; so does this server
            retained[name] = weights.read_bytes()
            while len(retained) > max_cpu_loras:
                retained.popitem(last=False)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    @get("/v1/models")
    async def models() -> dict[str, Any]:
        base = engine.base_model_name
        cards = [{"id": base, "object": "model", "created": created, "owned_by": "vllm", "root": base,
                  "parent": None, "max_model_len": engine.max_context}]
        cards += [{"id": a.name, "object": "model", "created": created, "owned_by": "vllm",
                   "root": roots.get(a.name), "parent": base} for a in engine.adapters()]
        return {"object": "list", "data": cards}

    # The bytes as received, parsed by serving.protocol; the structs document them.
    @post("/v1/chat/completions", status_code=200, dto=documented_body(ChatCompletionBody, raw=True), return_dto=None)
    async def chat_completions(data: JSONBody[bytes] = b"") -> Any:
        req = parse_chat_request(data)
        if not req.stream:
            result = await anyio.to_thread.run_sync(engine.generate, req)
            count(req.model)
            return chat_completion(result).to_dict()
        stream = await anyio.to_thread.run_sync(engine.stream, req)
        count(req.model)
        chunks = chat_chunks(stream, model=req.model, n=req.n, include_usage=req.include_usage,
                             id=new_id("chatcmpl"))
        return Stream(sse(chunks), media_type="text/event-stream")

    @post("/v1/completions", status_code=200, dto=documented_body(CompletionBody, raw=True), return_dto=None)
    async def completions(data: JSONBody[bytes] = b"") -> Any:
        req = parse_completion_request(data)
        if not req.stream:
            result = await anyio.to_thread.run_sync(engine.generate, req)
            count(req.model)
            return completion(result).to_dict()
        stream = await anyio.to_thread.run_sync(engine.stream, req)
        count(req.model)
        chunks = completion_chunks(stream, model=req.model, include_usage=req.include_usage, id=new_id("cmpl"))
        return Stream(sse(chunks), media_type="text/event-stream")

    @get("/health")
    async def health() -> Response[Any]:
        return Response("", status_code=200)

    @get("/metrics")
    async def metrics() -> Response[Any]:
        lines = ["# TYPE vllm:request_success_total counter"]
        lines += [f'vllm:request_success_total{{engine="0",model_name="{m}"}} {n}' for m, n in sorted(served.items())]
        lines += ["# TYPE appliance_standin_retained_lora_bytes gauge",
                  f"appliance_standin_retained_lora_bytes {sum(map(len, retained.values()))}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return Litestar(
        route_handlers=[load_lora_adapter, unload_lora_adapter, models, chat_completions, completions, health,
                        metrics],
        exception_handlers={Exception: _on_error},
        before_request=check_key,
        debug=False,
    )


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vllm-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
