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

Replicas: give several URLs (several vLLM servers of the same base model on this
host, e.g. one per GPU) and the engine loads and unloads every adapter on each of
them, sends each request to the replica with the fewest outstanding requests
(skipping, and failing over from, one that does not answer), and
:meth:`VllmEngine.reconcile` makes each replica hold exactly the registered
adapters: a replica that restarted empty gets them back, one that missed an
unload drops it. The adapter directories are shared: one decrypted copy in tmpfs
per loaded adapter, whatever the number of replicas.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serving.adapters import AdapterFiles, BaseModelShape, ValidatedAdapter, check_adapter_name, validate_adapter
from serving.engine import AdapterInfo, AdapterRegistry, AdapterSource, GenerationStream, Pin
from serving.errors import AdapterLoadError, EngineError, InvalidRequestError, ServerConfigError, model_not_found
from serving.replicas import Replica, ReplicaReport, ReplicaSet
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


class _ReplicaFailed(EngineError):
    """A replica did not answer (connection refused or dropped): the request may go to another one."""


class VllmEngine:
    """Serve through vLLM OpenAI servers; same interface as :class:`~serving.transformers_engine.TransformersEngine`.

    Args:
        base_url: The server, e.g. ``http://127.0.0.1:8000``; or several replicas of it, as a
            list or comma-separated (every one serves the same base model and reads the same tmpfs).
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
        retry_down_s: How long a replica that failed is skipped before requests try it again
            (:meth:`reconcile` brings it back sooner once it answers).
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
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
        retry_down_s: float = 5.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
        try:
            self._replicas = ReplicaSet(urls, headers=headers, timeout_s=timeout_s, retry_down_s=retry_down_s,
                                        transport=transport)
        except ValueError as exc:
            raise EngineError(f"`base_url` {base_url!r}: {exc}", param="base_url") from None
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
        # Upstream adapters every replica must hold, and those being loaded or unloaded right now
        # (the reconciler leaves the latter alone).
        self._sync = threading.Lock()
        self._live: dict[str, _Upstream] = {}
        self._busy: set[str] = set()
        #: (replica URL, upstream name) -> why that replica refused that adapter: not retried.
        self._refused: dict[tuple[str, str], str] = {}
        #: Replicas whose runtime-LoRA routes were probed since they last came up.
        self._probed: set[str] = set()
        #: Adapter name -> replica URL -> what the last load or unload did there (for the audit log).
        self._fanouts: dict[str, dict[str, str]] = {}
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

    @property
    def replica_urls(self) -> list[str]:
        return [r.url for r in self._replicas.replicas]

    def replica_status(self) -> list[dict[str, Any]]:
        """Per replica: URL, up, outstanding and served requests, last error."""
        return self._replicas.status()

    def last_fanout(self, name: str) -> dict[str, str]:
        """Replica URL -> outcome of the last load or unload of adapter ``name`` there
        (``loaded``, ``unloaded``, ``refused: ...``, ``down: ...``); the reconciler retries the failures."""
        with self._sync:
            return dict(self._fanouts.get(name, {}))

    def _record_fanout(self, up: _Upstream, outcome: dict[str, str]) -> None:
        with self._sync:
            self._fanouts[up.name.rsplit("@", 1)[0]] = {
                r.url: outcome.get(r.url) or f"down: {r.last_error or 'skipped'}" for r in self._replicas.replicas}

    def _models(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` of the first replica that answers."""
        tried: list[Replica] = []
        while True:
            replica = self._next_replica(tried)
            tried.append(replica)
            try:
                return self._models_on(replica)
            except _ReplicaFailed:
                continue

    def _models_on(self, replica: Replica) -> list[dict[str, Any]]:
        data = self._call_on(replica, "GET", "/v1/models").json().get("data") or []
        if not data:
            raise EngineError(f"the vLLM server {replica.url} lists no models")
        return data

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the server answers ``GET /v1/models`` (vLLM takes minutes to start)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._models()
                problems = self.check_replicas()
                if problems:
                    raise ServerConfigError("; ".join(problems))
                return
            except ServerConfigError:
                raise
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
            with self._sync:
                self._busy.add(upstream.name)
            try:
                self._load_everywhere(upstream)
                with self._sync:
                    self._live[upstream.name] = upstream
            finally:
                with self._sync:
                    self._busy.discard(upstream.name)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return upstream

    def _load_everywhere(self, up: _Upstream) -> None:
        """Load ``up`` on every replica. One that refuses or is down is left to :meth:`reconcile`.

        Raises:
            AdapterLoadError: no replica took it and at least one refused it (a broken adapter).
            NoReplicaError: no replica answered.
        """
        loaded, misconfigured, outcome = [], [], {}
        refused: list[tuple[str, AdapterLoadError]] = []
        for replica in self._replicas.reachable():  # a replica known to be down is the reconciler's
            try:
                self._load_on(replica, up)
                loaded.append(replica.url)
                outcome[replica.url] = "loaded"
            except AdapterLoadError as exc:
                refused.append((replica.url, exc))
                outcome[replica.url] = f"refused: {exc.message}"
            except ServerConfigError as exc:
                misconfigured.append(exc)
                outcome[replica.url] = f"misconfigured: {exc.message}"
            except EngineError as exc:
                outcome[replica.url] = f"down: {exc.message}"
        self._record_fanout(up, outcome)
        if loaded and refused:  # live on some replicas: the reconciler must not retry it on the others
            with self._sync:
                self._refused.update({(url, up.name): exc.message for url, exc in refused})
        if not loaded:
            if refused:
                raise refused[0][1]
            if misconfigured:
                raise misconfigured[0]
            raise self._replicas.no_replica(self._replicas.replicas)
        if len(loaded) < len(self._replicas):
            log.warning("adapter not loaded on every replica; the reconciler will retry",
                        extra={"adapter": up.name, "replicas": self.last_fanout(up.name.rsplit("@", 1)[0])})

    def _load_on(self, replica: Replica, up: _Upstream) -> None:
        """Load ``up`` on one replica.

        Raises:
            AdapterLoadError: the server refused the adapter, whatever the status (vLLM >= 0.20 answers
                500 for an adapter it cannot load, earlier releases 400 or 404): never an outage.
            ServerConfigError: the server cannot take adapters at all (runtime updating off, wrong api
                key, no view of our tmpfs).
            EngineError: the server did not answer.
        """
        body = {"lora_name": up.name, "lora_path": str(up.path)}
        resp = self._call_on(replica, "POST", "/v1/load_lora_adapter", body, raw=True)
        if resp.status_code == 400 and "already" in _error_message(resp):
            # Left by an earlier life of this engine (same versioned name, maybe another directory):
            # replace it with ours.
            self._call_on(replica, "POST", "/v1/unload_lora_adapter", {"lora_name": up.name}, raw=True)
            resp = self._call_on(replica, "POST", "/v1/load_lora_adapter", body, raw=True)
        if resp.status_code != 200:
            raise self._load_refusal(replica, up, resp)

    def _load_refusal(self, replica: Replica, up: _Upstream, resp: httpx.Response) -> EngineError | AdapterLoadError:
        """What a refused load means: a server set up wrong, or an adapter it cannot take."""
        message = _error_message(resp)
        misconfigured = _misconfiguration(replica.url, resp)
        if misconfigured is None and "No adapter found" in message and up.path.is_dir():
            misconfigured = (f"the vLLM server {replica.url} cannot read the adapter directory the appliance "
                             f"just wrote ({up.path}): run vLLM on this host, as the appliance's user, with "
                             f"{self._root.parent} visible to it (deploy/vllm.md)")
        if misconfigured is not None:
            self._replicas.note_error(replica, misconfigured)
            return ServerConfigError(misconfigured)
        where = f" {replica.url}" if len(self._replicas) > 1 else ""
        return AdapterLoadError(f"the vLLM server{where} refused the adapter ({resp.status_code}): {message}",
                                param="files")

    def _unload_on(self, replica: Replica, upstream_name: str) -> None:
        resp = self._call_on(replica, "POST", "/v1/unload_lora_adapter", {"lora_name": upstream_name}, raw=True)
        if resp.status_code in (200, 404) and _misconfiguration(replica.url, resp) is None:
            return  # 404: the server already forgot it
        misconfigured = _misconfiguration(replica.url, resp)
        if misconfigured is not None:
            raise ServerConfigError(misconfigured)
        raise EngineError(f"the vLLM server {replica.url} refused to unload {upstream_name!r} "
                          f"({resp.status_code}): {_error_message(resp)}")

    def _deregister(self, up: _Upstream) -> None:
        with self._sync:
            self._busy.add(up.name)
            self._live.pop(up.name, None)
            for key in [k for k in self._refused if k[1] == up.name]:
                del self._refused[key]
        outcome: dict[str, str] = {}
        try:
            for replica in self._replicas.reachable():  # one that is down drops it when the reconciler sees it
                try:
                    self._unload_on(replica, up.name)
                    outcome[replica.url] = "unloaded"
                except EngineError as exc:  # the reconciler unloads it once the replica answers
                    outcome[replica.url] = f"down: {exc.message}"
                    log.warning("could not unload an adapter from a replica; the reconciler will retry",
                                extra={"adapter": up.name, "replica": replica.url, "error": exc.message})
        finally:
            self._record_fanout(up, outcome)
            shutil.rmtree(up.path, ignore_errors=True)
            with self._sync:
                self._busy.discard(up.name)

    def reconcile(self, stray: Callable[[str], bool] | None = None) -> list[ReplicaReport]:
        """Make every replica hold the registered adapters (a restarted one gets them back).

        Args:
            stray: Says which adapters a replica lists that this engine did not register are to be
                unloaded (by upstream name); default: all of them, as when the replicas are this
                engine's alone.

        Failures are reported and retried on the next call.
        """
        reports = []
        for replica in self._replicas.replicas:
            report = ReplicaReport(replica.url, up=False)
            reports.append(report)
            was_down = not replica.up
            try:
                cards = self._models_on(replica)  # marks it up or down
            except ServerConfigError as exc:  # answers, but not to us (api key)
                report.up, report.error = True, exc.message
                continue
            except EngineError as exc:
                report.error = exc.message
                self._probed.discard(replica.url)
                continue
            report.up, report.came_back = True, was_down
            if replica.url not in self._probed or was_down:
                report.error = self._probe(replica)
                if report.error is not None:
                    continue
            listed = {c["id"] for c in cards if c.get("parent")}  # vLLM lists adapters with their base as parent
            with self._sync:
                live, busy = dict(self._live), set(self._busy)
                refused = {name: why for (url, name), why in self._refused.items() if url == replica.url}
            for name in sorted(set(live) - listed - busy):
                if name in refused:  # it would refuse it again: reported, not retried
                    report.refused[name] = refused[name]
                    continue
                try:
                    self._load_on(replica, live[name])
                    report.loaded.append(name)
                except AdapterLoadError as exc:
                    report.refused[name] = exc.message
                    with self._sync:
                        self._refused[(replica.url, name)] = exc.message
                except ServerConfigError as exc:
                    report.error = exc.message
                    break
                except EngineError as exc:
                    report.failed[name] = exc.message
            for name in sorted(listed - set(live) - busy):
                if stray is not None and not stray(name):
                    continue
                try:
                    self._unload_on(replica, name)
                    report.unloaded.append(name)
                except EngineError as exc:
                    report.failed[name] = exc.message
            if report.changed:
                log.info("replica reconciled", extra=report.to_dict())
        return reports

    def _probe(self, replica: Replica) -> str | None:
        """Whether ``replica`` takes runtime LoRA updates; the problem in words if not.

        An empty load request costs nothing: a server with the routes answers 400 (no name, no
        path), one started without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` 404 ``{"detail": "Not Found"}``.
        """
        try:
            resp = self._call_on(replica, "POST", "/v1/load_lora_adapter", {}, raw=True)
        except ServerConfigError as exc:
            return exc.message
        except EngineError:
            return None  # down: the next pass probes it again
        problem = _misconfiguration(replica.url, resp)
        if problem is None:
            self._probed.add(replica.url)
        else:
            self._replicas.note_error(replica, problem)
            log.warning("vLLM replica cannot take adapters", extra={"replica": replica.url, "error": problem})
        return problem

    def check_replicas(self) -> list[str]:
        """The set-up problems of the replicas that answer (wrong api key, runtime LoRA updating off); [] if none."""
        problems = []
        for replica in self._replicas.replicas:
            try:
                self._models_on(replica)
            except ServerConfigError as exc:
                problems.append(exc.message)
                continue
            except EngineError:
                continue
            problem = self._probe(replica)
            if problem is not None:
                problems.append(problem)
        return problems

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
            tried: list[Replica] = []
            while True:
                replica = self._next_replica(tried)
                tried.append(replica)
                try:
                    with self._replicas.using(replica):
                        resp = self._with_retry(replica, pin, lambda upstream: self._call_on(
                            replica, "POST", _path(request), _body(request, upstream, stream=False)))
                except _ReplicaFailed:
                    continue  # it never answered: another replica may
                break
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
        """Yield ``None`` once a replica accepted the request, then its deltas and usage."""
        tried: list[Replica] = []
        while True:
            replica = self._next_replica(tried)
            tried.append(replica)
            try:
                with self._replicas.using(replica):
                    answered = yield from self._events_on(replica, request, pin)
            except _ReplicaFailed:  # it died while its lost adapter was being reloaded: nothing was sent yet
                answered = False
            if answered:
                return

    def _events_on(self, replica: Replica, request: GenerationRequest,
                   pin: Pin[_Upstream] | None) -> Iterator[Delta | Usage | None]:
        """Stream from one replica; returns False (having yielded nothing) if it did not answer."""
        for attempt in (0, 1):
            body = _body(request, pin.handle if pin else None, stream=True)
            started = False
            try:
                with replica.http.stream("POST", _path(request), json=body) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        if resp.status_code == 404 and pin and attempt == 0 and self._server_forgot(replica, pin):
                            continue
                        _raise_for(resp, request.model)
                    self._replicas.mark_up(replica)
                    started = True
                    yield None
                    yield from _parse_sse(resp, chat=isinstance(request, ChatCompletionRequest))
                    return True
            except httpx.HTTPError as exc:
                if started:
                    raise EngineError(f"the vLLM server {replica.url} failed mid-stream: {exc}") from exc
                self._down(replica, exc)
                if isinstance(exc, httpx.ReadTimeout):
                    raise EngineError(f"the vLLM server {replica.url} did not answer in time: {exc}") from exc
                return False
        return True  # pragma: no cover - the loop returns or raises

    def _pin(self, model: str) -> Pin[_Upstream] | None:
        if model == self.base_model_name:
            return None
        return self._registry.pin(model)

    def _with_retry(self, replica: Replica, pin: Pin[_Upstream] | None, send: Any) -> httpx.Response:
        resp = send(pin.handle if pin else None)
        if resp.status_code == 404 and pin is not None and self._server_forgot(replica, pin):
            resp = send(pin.handle)
        return resp

    def _server_forgot(self, replica: Replica, pin: Pin[_Upstream]) -> bool:
        """After a 404 for a loaded adapter: if the replica lost it (restart), load it again from its directory."""
        ids = {c["id"] for c in self._models_on(replica)}
        if pin.handle.name in ids:
            return False
        log.warning("vLLM lost a loaded adapter; loading it again",
                    extra={"adapter": pin.name, "replica": replica.url})
        self._load_on(replica, pin.handle)
        return True

    # ------------------------------------------------------------------ http

    def _next_replica(self, tried: list[Replica]) -> Replica:
        candidates = self._replicas.candidates(exclude=tried)
        if not candidates:
            raise self._replicas.no_replica(tried)
        return candidates[0]

    def _down(self, replica: Replica, exc: Exception) -> None:
        if self._replicas.mark_down(replica, f"unreachable: {exc}") and len(self._replicas) > 1:
            log.warning("serving replica unreachable; sending requests to the others",
                        extra={"replica": replica.url, "error": str(exc)})

    def _call_on(self, replica: Replica, method: str, path: str,
                 body: dict[str, Any] | None = None, *, raw: bool = False) -> httpx.Response:
        """One request to one replica; a 5xx raises :class:`EngineError` unless ``raw`` (the caller reads it)."""
        try:
            resp = replica.http.request(method, path, json=body)
        except httpx.ReadTimeout as exc:  # it took the request and hangs: skip it, but do not run the request twice
            self._down(replica, exc)
            raise EngineError(f"the vLLM server {replica.url} did not answer in time: {exc}") from exc
        except httpx.HTTPError as exc:
            self._down(replica, exc)
            raise _ReplicaFailed(f"the vLLM server {replica.url} is unreachable: {exc}") from exc
        self._replicas.mark_up(replica)
        if resp.status_code == 401:
            raise ServerConfigError(_misconfiguration(replica.url, resp) or "")
        if resp.status_code >= 500 and not raw:
            raise EngineError(f"the vLLM server {replica.url} failed ({resp.status_code}): {_error_message(resp)}")
        return resp

    def close(self) -> None:
        """Unload every adapter from the replicas, remove the tmpfs directory, close connections."""
        try:
            self._registry.close()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
            self._replicas.close()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


#: The adapter directories this process made (several engines, one per base model, share a pid).
_OURS: set[str] = set()
_DIR_RE = re.compile(r"^appliance-lora-(?P<pid>\d+)-[0-9a-f]{12}$")


def _private_dir(shm: Path) -> Path:
    if not shm.is_dir():
        raise EngineError(f"shm_dir {str(shm)!r} does not exist; point it at a tmpfs such as /dev/shm")
    swept = sweep_stale_dirs(shm)
    if swept:
        log.warning("removed decrypted adapters left in tmpfs by a process that is gone",
                    extra={"shm_dir": str(shm), "directories": swept})
    path = shm / f"appliance-lora-{os.getpid()}-{secrets.token_hex(6)}"
    os.mkdir(path, 0o700)
    _OURS.add(path.name)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise EngineError(f"{str(path)!r} is not a private directory")
    return path


def sweep_stale_dirs(shm: Path) -> int:
    """Remove this user's ``appliance-lora-<pid>-*`` directories whose process is gone; how many.

    They hold decrypted adapters and outlive a crash (SIGKILL, OOM, power loss of the process, not
    of the host): an engine sweeps them when it starts. A directory whose pid is this process's
    but which this process did not make is a former life's (a container restarts with the same pid).
    """
    swept = 0
    for entry in shm.iterdir():
        m = _DIR_RE.match(entry.name)
        if m is None or entry.name in _OURS:
            continue
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        swept += 1
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def _misconfiguration(url: str, resp: httpx.Response) -> str | None:
    """The set-up problem a vLLM answer reveals (wrong api key, runtime LoRA updating off), if any."""
    if resp.status_code == 401:
        return (f"the vLLM server {url} refused the appliance's api key (401): write the token it was started "
                "with (--api-key or VLLM_API_KEY) to the file APPLIANCE_VLLM_API_KEY_FILE names")
    if resp.status_code == 404 and resp.request.url.path.endswith("_lora_adapter"):
        try:
            route_missing = resp.json() == {"detail": "Not Found"}  # FastAPI's answer for a route it lacks
        except ValueError:
            route_missing = False
        if route_missing:
            return (f"runtime LoRA updating is off on the vLLM server {url} (it has no "
                    f"{resp.request.url.path}): start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora")
    return None


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
