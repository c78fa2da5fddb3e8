"""A client of a vLLM OpenAI server with runtime LoRA loading (the production GPU engine).

The server runs on the same host, started as ``deploy/vllm.md`` describes
(``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). vLLM loads
adapters from a directory and re-reads it after evicting an adapter from its
cache, so each loaded adapter's two files live in a private tmpfs directory
(``/dev/shm/...``, mode 0700, files 0600) from load until unload; nothing else
is written. Adapters are validated here first, with the same rules as the
embedded engine, so a broken adapter never reaches the server.

Each load registers the adapter upstream under a fresh versioned name
(``name@N``): replacing an adapter loads the new version before the old one
is dropped, and requests never see a half-replaced adapter. If the server
forgets an adapter (it restarted), the client loads it again from its
directory and retries once.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import InvalidRequestError
from serving.adapters import AdapterFiles, BaseModelShape, ValidatedAdapter, check_adapter_name, validate_adapter
from serving.engine import AdapterInfo, AdapterRegistry, AdapterSource, GenerationStream, Pin
from serving.errors import AdapterLoadError, EngineError, model_not_found
from serving.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    Delta,
    GenerationRequest,
    GenerationResult,
    Usage,
    message_text,
)

log = logging.getLogger("serving.vllm")

__all__ = ["VllmEngine"]


@dataclass(frozen=True)
class _Upstream:
    """An adapter as registered on the server: its versioned name and its directory."""

    name: str
    path: Path


class VllmEngine:
    """Serve through a vLLM OpenAI server; same interface as :class:`~serving.transformers_engine.TransformersEngine`.

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8000``.
        base_model_name: The name vLLM serves the base under (``--served-model-name``);
            default: the first model ``GET /v1/models`` lists.
        base_model_dir: The base model's directory on this host: gives the tokenizer for
            :meth:`apply_chat_template` and the layer shapes that adapter validation checks.
        adapter_source: Reloads an adapter evicted from the resident set, by name.
        max_resident_adapters: Most adapters registered on the server at once (each keeps a
            tmpfs directory); match vLLM's ``--max-cpu-loras``.
        max_lora_rank: vLLM's ``--max-lora-rank``.
        shm_dir: Where the private adapter directories go (a tmpfs).
        api_key: Sent as a bearer token when vLLM runs with ``--api-key``.
        timeout_s: Read timeout for one generation.
    """

    def __init__(
        self,
        base_url: str,
        *,
        base_model_name: str | None = None,
        base_model_dir: str | Path | None = None,
        adapter_source: AdapterSource | None = None,
        max_resident_adapters: int = 64,
        max_lora_rank: int = 64,
        shm_dir: str | Path = "/dev/shm",
        api_key: str | None = None,
        timeout_s: float = 600.0,
        base_model_aliases: Sequence[str] = (),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._base_name = base_model_name
        self._max_context: int | None = None
        self.max_lora_rank = max_lora_rank
        self._tokenizer: Any = None
        self._tok_lock = threading.Lock()
        self._base_dir = Path(base_model_dir) if base_model_dir else None
        self._shape: BaseModelShape | None = None
        self._aliases = list(base_model_aliases)
        self._versions = itertools.count(1)
        self._root = _private_dir(Path(shm_dir))
        self._registry: AdapterRegistry[_Upstream] = AdapterRegistry(
            validate=self._validate, load=self._register, unload=self._deregister,
            max_resident=max_resident_adapters, source=adapter_source,
        )

    # ------------------------------------------------------------------ server facts

    @property
    def base_model_name(self) -> str:
        if self._base_name is None:
            self._base_name = self._models()[0]["id"]
        return self._base_name

    @property
    def max_context(self) -> int:
        if self._max_context is None:
            cards = {c["id"]: c for c in self._models()}
            card = cards.get(self.base_model_name, {})
            self._max_context = int(card.get("max_model_len") or 0) or 2**31 - 1
        return self._max_context

    def _models(self) -> list[dict[str, Any]]:
        data = self._call("GET", "/v1/models").json().get("data") or []
        if not data:
            raise EngineError("the vLLM server lists no models")
        return data

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the server answers ``GET /v1/models`` (vLLM takes minutes to start)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._models()
                return
            except EngineError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, files: AdapterFiles | Path | None = None, *,
                     replace: bool = False) -> AdapterInfo:
        check_adapter_name(name, self.base_model_name)
        return self._registry.load(name, files, replace=replace)

    def unload_adapter(self, name: str) -> None:
        self._registry.unload(name)

    def adapters(self) -> list[AdapterInfo]:
        return self._registry.infos()

    def has_adapter(self, name: str) -> bool:
        return self._registry.has(name)

    def resident_adapters(self) -> list[str]:
        return self._registry.resident_names()

    def _validate(self, files: AdapterFiles | Path) -> ValidatedAdapter:
        if self._shape is None and self._base_dir is not None:
            self._shape = BaseModelShape.from_config_dir(self._base_dir, self.base_model_name, self._aliases)
        return validate_adapter(files, self._shape, max_rank=self.max_lora_rank)

    def _register(self, name: str, adapter: ValidatedAdapter) -> _Upstream:
        version = next(self._versions)
        path = self._root / f"{version}"
        os.mkdir(path, 0o700)
        try:
            for filename, data in adapter.files.items():
                fd = os.open(path / filename, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            upstream = _Upstream(name=f"{name}@{version}", path=path)
            self._load_upstream(upstream)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return upstream

    def _load_upstream(self, up: _Upstream) -> None:
        resp = self._http_post("/v1/load_lora_adapter", {"lora_name": up.name, "lora_path": str(up.path)})
        if resp.status_code != 200:
            message = _error_message(resp)
            raise AdapterLoadError(f"the vLLM server refused the adapter ({resp.status_code}): {message}",
                                   param="files")

    def _deregister(self, up: _Upstream) -> None:
        try:
            resp = self._http_post("/v1/unload_lora_adapter", {"lora_name": up.name})
            if resp.status_code not in (200, 404):  # 404: the server already forgot it
                log.warning("vLLM refused to unload an adapter", extra={"adapter": up.name,
                                                                          "status": resp.status_code})
        except EngineError:
            log.warning("vLLM unreachable while unloading an adapter", extra={"adapter": up.name})
        finally:
            shutil.rmtree(up.path, ignore_errors=True)

    # ------------------------------------------------------------------ prompts

    def apply_chat_template(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
        if self._base_dir is None:
            raise EngineError("apply_chat_template needs the base model's directory (base_model_dir)")
        with self._tok_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._base_dir)
            plain = [{"role": m.role, "content": m.text()} if isinstance(m, ChatMessage)
                     else {"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
            return self._tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        request.validate(self._max_context)
        pin = self._pin(request.model)
        try:
            resp = self._with_retry(pin, lambda upstream: self._http_post(
                _path(request), _body(request, upstream, stream=False)))
            _raise_for(resp, request.model)
            data = resp.json()
        finally:
            if pin:
                pin.release()
        if isinstance(request, ChatCompletionRequest):
            choices = [Choice(c["index"], (c.get("message") or {}).get("content") or "", c.get("finish_reason"))
                       for c in data["choices"]]
        else:
            choices = [Choice(c["index"], c.get("text") or "", c.get("finish_reason")) for c in data["choices"]]
        u = data.get("usage") or {}
        return GenerationResult(model=request.model, choices=sorted(choices, key=lambda c: c.index),
                                usage=Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)))

    def stream(self, request: GenerationRequest) -> GenerationStream:
        request.validate(self._max_context)
        pin = self._pin(request.model)
        try:
            events = self._events(request, pin)
            next(events)  # send the request now, so errors surface here and not mid-iteration
        except BaseException:
            if pin:
                pin.release()
            raise

        def all_events() -> Iterator[Delta | Usage]:
            try:
                yield from events  # type: ignore[misc]
            finally:
                events.close()
                if pin:
                    pin.release()

        return GenerationStream(request.model, all_events())

    def _events(self, request: GenerationRequest, pin: Pin[_Upstream] | None) -> Iterator[Delta | Usage | None]:
        """Yield ``None`` once the server accepted the request, then its deltas and usage."""
        for attempt in (0, 1):
            body = _body(request, pin.handle if pin else None, stream=True)
            try:
                with self._http.stream("POST", _path(request), json=body) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        if resp.status_code == 404 and pin and attempt == 0 and self._server_forgot(pin):
                            continue
                        _raise_for(resp, request.model)
                    yield None
                    yield from _parse_sse(resp, chat=isinstance(request, ChatCompletionRequest))
                    return
            except httpx.HTTPError as exc:
                raise EngineError(f"the vLLM server is unreachable: {exc}") from exc

    def _pin(self, model: str) -> Pin[_Upstream] | None:
        if model == self.base_model_name:
            return None
        return self._registry.pin(model)

    def _with_retry(self, pin: Pin[_Upstream] | None, send: Any) -> httpx.Response:
        resp = send(pin.handle if pin else None)
        if resp.status_code == 404 and pin is not None and self._server_forgot(pin):
            resp = send(pin.handle)
        return resp

    def _server_forgot(self, pin: Pin[_Upstream]) -> bool:
        """After a 404 for a loaded adapter: if vLLM lost it (restart), load it again from its directory."""
        ids = {c["id"] for c in self._models()}
        if pin.handle.name in ids:
            return False
        log.warning("vLLM lost a loaded adapter; loading it again", extra={"adapter": pin.name})
        self._load_upstream(pin.handle)
        return True

    # ------------------------------------------------------------------ http

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server is unreachable: {exc}") from exc
        if resp.status_code >= 500:
            raise EngineError(f"the vLLM server failed ({resp.status_code}): {_error_message(resp)}")
        return resp

    def _http_post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self._call("POST", path, body)

    def close(self) -> None:
        """Unload every adapter from the server, remove the tmpfs directory, close connections."""
        try:
            self._registry.close()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
            self._http.close()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def _private_dir(shm: Path) -> Path:
    if not shm.is_dir():
        raise EngineError(f"shm_dir {str(shm)!r} does not exist; point it at a tmpfs such as /dev/shm")
    path = shm / f"appliance-lora-{os.getpid()}-{secrets.token_hex(6)}"
    os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise EngineError(f"{str(path)!r} is not a private directory")
    return path


def _path(request: GenerationRequest) -> str:
    return "/v1/chat/completions" if isinstance(request, ChatCompletionRequest) else "/v1/completions"


def _body(request: GenerationRequest, upstream: _Upstream | None, *, stream: bool) -> dict[str, Any]:
    body = request.to_dict()
    if upstream is not None:
        body["model"] = upstream.name
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}  # always: GenerationStream.usage needs it
    else:
        body.pop("stream_options", None)
    return body


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return resp.text[:500]
    if isinstance(data, dict):
        err = data.get("error", data)  # newer vLLM nests the error; older ones put it at the top
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    return str(data)[:500]


def _raise_for(resp: httpx.Response, model: str) -> None:
    if resp.status_code == 200:
        return
    message = _error_message(resp)
    if resp.status_code == 404:
        raise model_not_found(model)
    if resp.status_code in (400, 422):
        param = None
        try:
            err = resp.json().get("error", resp.json())
            param = err.get("param") if isinstance(err, dict) else None
        except ValueError:
            pass
        raise InvalidRequestError(f"the vLLM server rejected the request: {message}", param=param)
    raise EngineError(f"the vLLM server answered {resp.status_code}: {message}")


def _parse_sse(resp: httpx.Response, *, chat: bool) -> Iterator[Delta | Usage]:
    for line in resp.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise EngineError(f"the vLLM server failed mid-stream: {message}")
        for c in chunk.get("choices") or []:
            text = ((c.get("delta") or {}).get("content") if chat else c.get("text")) or ""
            if text or c.get("finish_reason"):
                yield Delta(c["index"], text, c.get("finish_reason"))
        if chunk.get("usage"):
            u = chunk["usage"]
            yield Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
