"""Chat and completions over the catalogue's models: routing, access, hot-load, guard, audit.

One engine serves one base model and its adapters; its kind (``transformers``, ``vllm`` or
``diffusers``) is looked up in :mod:`serving.registry`. Engines start on first use
(or when an adapter of their base is published) and are kept while the
process lives; ``max_engines`` bounds how many base models are resident.
Adapters are decrypted in memory by the catalogue whenever an engine needs
them (first load, or reload after eviction).

With ``APPLIANCE_SERVING_ENGINE=vllm`` the engine is a client of one or more
vLLM-protocol servers (replicas). Its engine starts when an adapter of its base
is published, so publishing reaches every replica at once; deleting an adapter
unloads it from every replica; :meth:`InferenceService.reconcile` (run every
``APPLIANCE_SERVING_RECONCILE_S`` by :class:`ServingReconciler`) makes the
engine hold what the database publishes and each replica hold what the engine
holds. Those fan-outs are audited as ``serving.*`` events of ``system:serving``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.audit.service import AuditContext, record
from appliance.catalog.service import CatalogService
from appliance.db.base import Database
from appliance.errors import MODEL_NAME_LIKE, ApplianceError, ConflictError, InvalidRequestError, NotFoundError, echo
from appliance.identity.service import Principal, project_by_id
from appliance.inference.guard import OutputGuard
from appliance.policy.service import PolicyService
from appliance.settings import ServingSettings
from serving.engine import Engine
from serving.errors import AdapterLoadError, EngineError
from serving.protocol import GenerationRequest, GenerationResult
from serving.registry import EngineSpec, create_engine

if TYPE_CHECKING:
    from appliance.catalog.models import BaseModelRecord

log = logging.getLogger("appliance.inference")

#: Who the serving fan-outs (hot-load on publish, unload on delete, reconciliation) are audited as.
SERVING_CTX = AuditContext(actor="system:serving", auth_method="internal", origin_ip="local")


@dataclass(frozen=True)
class Target:
    """Where a request goes: the engine, the name to use in it, whose policy guards it."""

    engine: Any  # serving.engine.TextEngine for text (kind "llm"), serving.engine.ImageEngine for images
    model: str
    project_id: int | None
    base: str
    kind: str = "llm"


class InferenceService:
    """Routes OpenAI-shaped requests to engines; guards and audits them.

    Args:
        db: The database (audit events, projects).
        catalog: Base models and adapters.
        policies: Project policies for the output guard.
        scanner_factory: Returns the shared, thread-safe scanner (loaded on first use).
        settings: Engine kind and limits.
    """

    def __init__(self, db: Database, catalog: CatalogService, policies: PolicyService, scanner_factory: Any,
                 settings: ServingSettings) -> None:
        self.db, self.catalog, self.policies, self.settings = db, catalog, policies, settings
        self._scanner_factory = scanner_factory
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Lock] = {}
        #: Adapters an operator loaded through /v1/load_lora_adapter: name -> base model.
        self._runtime: dict[str, str] = {}
        #: Last failures the reconciler audited per base model and replica (JSON), to audit changes only.
        self._last_failures: dict[str, str] = {}
        #: Published adapters the serving replicas refused: adapter id -> why. The reconciler does not
        #: retry them (the same bytes would be refused again) until a replica restarts; a request does.
        self._refused: dict[str, str] = {}
        catalog.on_publish.append(self.on_adapter_published)
        catalog.on_remove.append(self.on_adapter_removed)
        catalog.runtime_adapters = self.runtime_adapters

    # -- engines ------------------------------------------------------------
    def _engine_kind(self, base: BaseModelRecord) -> str:
        """The :mod:`serving.registry` kind serving ``base``: images by diffusers, text as configured."""
        return "diffusers" if base.kind == "diffusion" else self.settings.engine

    def _new_engine(self, base: BaseModelRecord) -> Engine:
        if self.settings.engine != "vllm" and base.kind in ("llm", "diffusion") and not Path(base.path).is_dir():
            # Else the loader takes the path for a hub repository id and fails with a 500.
            raise EngineError(f"base model {base.name!r} has no files at {base.path}: re-import it with "
                              "`appliance models import`", param="model")
        device = None if self.settings.device == "auto" else self.settings.device
        replica_urls: list[str] = []
        if self._engine_kind(base) == "vllm":
            try:
                replica_urls = self.settings.vllm_urls_for(base.name)
            except ValueError as exc:
                raise EngineError(f"APPLIANCE_VLLM_URL: {exc}", param="model") from None
        engine = create_engine(self._engine_kind(base), EngineSpec(
            model_dir=base.path, name=base.name, device=device,
            adapter_source=self.catalog.adapter_files, max_resident_adapters=self.settings.max_resident_adapters,
            replica_urls=replica_urls, shm_dir=self.settings.shm_dir,
            api_key_file=self.settings.vllm_api_key_file))
        if hasattr(engine, "reconcile"):  # replicated engines: published adapters onto every replica, strays off
            try:
                self._reconcile_engine(base.name, engine)
            except Exception:
                log.exception("could not reconcile the serving replicas; the reconciler will retry",
                              extra={"base_model": base.name})
        return engine

    def engine_for(self, base_name: str) -> Engine:
        """The engine of a base model, started if needed (one start at a time per base)."""
        with self._lock:
            engine = self._engines.get(base_name)
            if engine is not None:
                self._engines.move_to_end(base_name)
                return engine
            start_lock = self._starting.setdefault(base_name, threading.Lock())
        with start_lock:
            with self._lock:
                if base_name in self._engines:
                    return self._engines[base_name]
            base = self.catalog.get_base_model(base_name)
            started = time.perf_counter()
            engine = self._new_engine(base)
            log.info("engine started", extra={"base_model": base_name,
                                               "ms": round((time.perf_counter() - started) * 1000)})
            with self._lock:
                self._engines[base_name] = engine
                while len(self._engines) > self.settings.max_engines:
                    _, old = self._engines.popitem(last=False)
                    old.close()
            return engine

    def resident_engines(self) -> list[str]:
        with self._lock:
            return list(self._engines)

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), OrderedDict()
        for engine in engines:
            engine.close()

    # -- operator-loaded adapters (vLLM's runtime LoRA endpoints) ---------------
    def load_runtime_adapter(self, name: str, path: Path, base: str) -> None:
        engine = self.engine_for(base)
        engine.load_adapter(name, path)
        with self._lock:
            self._runtime[name] = base

    def unload_runtime_adapter(self, name: str) -> bool:
        with self._lock:
            base = self._runtime.pop(name, None)
        if base is None:
            return False
        engine = self.engine_for(base)
        if engine.has_adapter(name):
            engine.unload_adapter(name)
        return True

    def runtime_adapters(self) -> dict[str, str]:
        with self._lock:
            return dict(self._runtime)

    # -- hot-load -----------------------------------------------------------
    def on_adapter_published(self, adapter_id: str) -> None:
        """Load a new adapter into its base's engine if that engine is running (else on first use).

        vLLM engines are started for it (they only hold HTTP clients), so the adapter reaches
        every serving replica now.
        """
        view = self.catalog.get_adapter(None, adapter_id)
        base = view.row.base_model
        with self._lock:
            engine = self._engines.get(base)
        if engine is None and self._replicated(self.catalog.get_base_model(base)):
            engine = self.engine_for(base)
        if engine is None:
            return
        try:
            loaded = self._ensure_loaded(engine, adapter_id)
        except AdapterLoadError as exc:
            self._refusal(engine, adapter_id, view.project, exc)
            raise
        if loaded:
            self._audit_fanout(engine, "serving.load_adapter", adapter_id, view.project, "published")

    def _refusal(self, engine: Engine, adapter_id: str, project: str | None, exc: AdapterLoadError) -> None:
        """Remember and audit (once) that the engine refused a published adapter."""
        if self._refused.get(adapter_id) == exc.message:
            return
        self._refused[adapter_id] = exc.message
        fanout = getattr(engine, "last_fanout", None)
        with self.db.transaction() as s:
            record(s, SERVING_CTX, "serving.load_adapter", resource_type="model", resource_id=adapter_id,
                   project=project, reason="refused", outcome="failure",
                   details={"base_model": engine.base_model_name, "error": exc.message,
                            "replicas": fanout(adapter_id) if fanout else {}})

    def on_adapter_removed(self, adapter_id: str) -> None:
        with self._lock:
            engines = list(self._engines.values())
        for engine in engines:
            if engine.has_adapter(adapter_id):
                engine.unload_adapter(adapter_id)
                self._audit_fanout(engine, "serving.unload_adapter", adapter_id, None, "deleted")

    # -- serving replicas (vLLM) ----------------------------------------------
    def _replicated(self, base: BaseModelRecord) -> bool:
        return self.settings.engine == "vllm" and base.kind == "llm"

    @staticmethod
    def _ensure_loaded(engine: Engine, name: str) -> bool:
        """Load ``name`` unless the engine has it; True if this call loaded it."""
        if engine.has_adapter(name):
            return False
        try:
            engine.load_adapter(name)
        except ConflictError:
            if not engine.has_adapter(name):  # not a concurrent load of the same adapter: a real conflict
                raise
            return False
        return True

    def _audit_fanout(self, engine: Engine, action: str, adapter_id: str, project: str | None, reason: str) -> None:
        """Audit a load or unload on the serving replicas, with what it did on each (failures are retried)."""
        fanout = getattr(engine, "last_fanout", None)
        if fanout is None:
            return  # embedded engines: loading is internal to this process
        replicas = fanout(adapter_id)
        done = "loaded" if action == "serving.load_adapter" else "unloaded"
        with self.db.transaction() as s:
            record(s, SERVING_CTX, action, resource_type="model", resource_id=adapter_id, project=project,
                   reason=reason, outcome="success" if all(v == done for v in replicas.values()) else "failure",
                   details={"base_model": engine.base_model_name, "replicas": replicas})

    def start_replicated_engines(self) -> list[str]:
        """Start the vLLM engine of each LLM base model (up to ``max_engines``): the start-up check.

        Starting one checks its servers (api key, runtime LoRA updating; a problem is logged and
        audited as ``serving.reconcile``) and puts the published adapters back on them. Returns the
        base models whose engine started.
        """
        started = []
        bases = [b for b in self.catalog.list_base_models() if self._replicated(b)]
        for base in bases[: self.settings.max_engines]:
            try:
                self.engine_for(base.name)
                started.append(base.name)
            except Exception:
                log.exception("could not start the serving engine; the reconciler retries on use",
                              extra={"base_model": base.name})
        return started

    def reconcile(self) -> dict[str, list[dict[str, Any]]]:
        """Bring every running vLLM engine, and each of its replicas, in line with the catalogue.

        Returns:
            Base model -> one report per replica (what was loaded, unloaded, or failed).
        """
        with self._lock:
            engines = [(name, e) for name, e in self._engines.items() if hasattr(e, "reconcile")]
        out: dict[str, list[dict[str, Any]]] = {}
        for base, engine in engines:
            try:
                out[base] = self._reconcile_engine(base, engine)
            except Exception:
                log.exception("serving reconciliation failed", extra={"base_model": base})
        return out

    def _reconcile_engine(self, base: str, engine: Any) -> list[dict[str, Any]]:
        published = {v.row.id: v.project for v in self.catalog.list_adapters(None) if v.row.base_model == base}
        registered = {a.name for a in engine.adapters()}
        for name in sorted(registered):
            if name.startswith("ft:") and name not in published:  # deleted through another control plane
                try:
                    engine.unload_adapter(name)
                except NotFoundError:
                    continue
                registered.discard(name)
                self._audit_fanout(engine, "serving.unload_adapter", name, None, "no longer published")
        for name in sorted(set(published) - registered):
            if len(registered) >= self.settings.max_resident_adapters:
                break  # the rest load on first use, as after an eviction
            if name in self._refused:
                continue  # refused as it is; retried when a replica restarts, or by a request
            try:
                loaded = self._ensure_loaded(engine, name)
            except AdapterLoadError as exc:
                self._refusal(engine, name, published[name], exc)
                continue
            except ApplianceError as exc:
                log.warning("could not load a published adapter onto the replicas",
                            extra={"adapter": name, "error": exc.message})
                continue
            registered.add(name)
            if loaded:
                self._audit_fanout(engine, "serving.load_adapter", name, published[name], "published (reconciled)")
        # Unload from the replicas what is no longer published, whoever loaded it; leave other
        # adapters alone (another control-plane process may share these replicas).
        reports = engine.reconcile(stray=lambda up: _is_withdrawn(up, published))
        if any(r.came_back for r in reports):  # a restarted server may take what it refused (new flags)
            for name in [n for n in self._refused if n in published]:
                del self._refused[name]
        changed = []
        for r in reports:
            # A failure that persists is audited once, not every pass.
            key, seen = f"{base} {r.replica}", json.dumps([r.failed, r.refused, r.error], sort_keys=True)
            trouble = r.failed or r.refused or r.error
            if r.loaded or r.unloaded or r.came_back or (trouble and self._last_failures.get(key) != seen):
                changed.append(r)
            self._last_failures[key] = seen
        if changed:
            with self.db.transaction() as s:
                for r in changed:
                    record(s, SERVING_CTX, "serving.reconcile",
                           outcome="failure" if r.failed or r.refused or r.error else "success",
                           resource_type="serving_replica", resource_id=r.replica,
                           details={"base_model": base, **r.to_dict()})
        return [r.to_dict() for r in reports]

    def replica_status(self) -> dict[str, list[dict[str, Any]]]:
        """Base model -> the state of each of its serving replicas (vLLM engines only)."""
        with self._lock:
            engines = list(self._engines.items())
        return {name: e.replica_status() for name, e in engines if hasattr(e, "replica_status")}

    # -- requests -----------------------------------------------------------
    def resolve(self, principal: Principal, model: str) -> Target:
        """The engine and name for ``model``; another project's adapter answers 404 like a missing one."""
        if model.startswith("ft:"):
            view = self.catalog.get_adapter(principal, model)
            base = self.catalog.get_base_model(view.row.base_model)
            engine = self.engine_for(base.name)
            try:
                self._ensure_loaded(engine, model)
            except AdapterLoadError as exc:
                self._refusal(engine, model, view.project, exc)
                raise
            self._refused.pop(model, None)
            return Target(engine, model, view.row.project_id, base.name, base.kind)
        runtime_base = self.runtime_adapters().get(model)
        if runtime_base is not None and principal.is_global:
            # Operator-loaded adapters belong to no project: only global roles may use them.
            return Target(self.engine_for(runtime_base), model, None, runtime_base)
        try:
            base = self.catalog.get_base_model(model)
        except NotFoundError:
            raise NotFoundError(f"model {echo(model, MODEL_NAME_LIKE)} not found; see GET /v1/models", param="model") from None
        return Target(self.engine_for(base.name), base.name, principal.project_id, base.name, base.kind)

    def _expect(self, target: Target, kind: str) -> None:
        if target.kind != kind:
            endpoint = "/v1/images/generations" if target.kind == "diffusion" else "/v1/chat/completions"
            raise InvalidRequestError(f"model {target.model!r} is {'an image' if target.kind == 'diffusion' else 'a text'}"
                                      f" model; use {endpoint}", param="model")

    def guard_for(self, target: Target) -> OutputGuard | None:
        """The output guard of the project the request runs in (none for global callers on base models)."""
        if target.project_id is None:
            return None
        with self.db.read() as s:
            project = project_by_id(s, target.project_id)
        if project is None:
            return None
        return OutputGuard(self._scanner_factory(), self.policies.effective(project))

    def generate(self, principal: Principal, ctx: AuditContext, request: GenerationRequest,
                 kind: str) -> GenerationResult:
        started = time.perf_counter()
        target = self.resolve(principal, request.model)
        self._expect(target, "llm")
        guard = self.guard_for(target)
        result = target.engine.generate(request)
        if guard is not None:
            result = guard.guard_result(result)
        self.audit(ctx, principal, target, kind, result.usage, started, guard, stream=False,
                   ttft_s=result.time_to_first_token_s)
        return result

    def stream(self, principal: Principal, ctx: AuditContext, request: GenerationRequest,
               kind: str) -> Iterator[Any]:
        """A delta stream (guarded); the request is audited when the stream ends or is abandoned."""
        started = time.perf_counter()
        target = self.resolve(principal, request.model)
        self._expect(target, "llm")
        guard = self.guard_for(target)
        inner = target.engine.stream(request)
        stream = guard.guard_stream(inner) if guard is not None else inner
        return _AuditedStream(self, stream, ctx, principal, target, kind, started, guard)

    def images(self, principal: Principal, ctx: AuditContext, *, model: str, prompt: str, n: int = 1,
               size: str | None = None, seed: int | None = None, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, negative_prompt: str | None = None) -> list[bytes]:
        """PNG images from a base image model or a fine-tune of one; audited like chat (never the prompt)."""
        started = time.perf_counter()
        target = self.resolve(principal, model)
        self._expect(target, "diffusion")
        images = target.engine.generate(prompt, model=target.model, n=n, size=size, seed=seed,
                                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                        negative_prompt=negative_prompt)
        with self.db.read() as s:
            project = project_by_id(s, target.project_id) if target.project_id else None
        with self.db.transaction() as s:
            record(s, ctx, "inference.image", resource_type="model", resource_id=target.model,
                   project=project.name if project else None,
                   details={"base_model": target.base, "n": len(images), "size": size,
                            "num_inference_steps": num_inference_steps, "seed": seed,
                            "latency_ms": round((time.perf_counter() - started) * 1000, 1)})
        return images

    def audit(self, ctx: AuditContext, principal: Principal, target: Target, kind: str, usage: Any, started: float,
              guard: OutputGuard | None, *, stream: bool, ttft_s: float | None = None) -> None:
        with self.db.read() as s:
            project = project_by_id(s, target.project_id) if target.project_id else None
        details: dict[str, Any] = {
            "base_model": target.base, "stream": stream,
            "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None),
            "total_tokens": getattr(usage, "total_tokens", None),
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
            "time_to_first_token_ms": round(ttft_s * 1000, 1) if ttft_s else None,
            "guard": guard.report.to_dict() if guard is not None else None,
        }
        with self.db.transaction() as s:
            record(s, ctx, f"inference.{kind}", resource_type="model", resource_id=target.model,
                   project=project.name if project else None, details=details)


def _is_withdrawn(upstream: str, published: dict[str, str]) -> bool:
    """Whether an adapter a replica lists (``<model>@<version>``) is a fine-tune no longer published."""
    name = upstream.rsplit("@", 1)[0]
    return name.startswith("ft:") and name not in published


class ServingReconciler:
    """Runs :meth:`InferenceService.reconcile` every ``interval_s`` seconds (a server thread).

    Args:
        inference: The service whose vLLM engines to reconcile.
        interval_s: Seconds between passes; 0 disables the thread (engines still reconcile on start).
    """

    def __init__(self, inference: InferenceService, interval_s: int) -> None:
        self.inference, self.interval_s = inference, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        self.inference.start_replicated_engines()
        while not self._stop.wait(self.interval_s):
            try:
                self.inference.reconcile()
            except Exception:
                log.exception("serving reconciliation failed")

    def start(self) -> None:
        if self.interval_s > 0 and self.inference.settings.engine == "vllm":
            self._thread = threading.Thread(target=self._run, name="serving-reconciler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class _AuditedStream(Iterator[Any]):
    """Passes deltas through; audits once, when exhausted or closed."""

    def __init__(self, service: InferenceService, inner: Any, ctx: AuditContext, principal: Principal,
                 target: Target, kind: str, started: float, guard: OutputGuard | None) -> None:
        self.service, self.inner, self.ctx, self.principal = service, inner, ctx, principal
        self.target, self.kind, self.started, self.guard = target, kind, started, guard
        self._done = False
        self._first: float | None = None

    @property
    def usage(self) -> Any:
        return getattr(self.inner, "usage", None)

    def __iter__(self) -> _AuditedStream:
        return self

    def __next__(self) -> Any:
        try:
            delta = next(self.inner)
        except StopIteration:
            self._finish()
            raise
        if self._first is None:
            self._first = time.perf_counter()
        return delta

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        ttft = (self._first - self.started) if self._first else None
        try:
            self.service.audit(self.ctx, self.principal, self.target, self.kind, self.usage, self.started,
                               self.guard, stream=True, ttft_s=ttft)
        except Exception:
            log.exception("could not audit a streamed request")

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()
        self._finish()

    def __del__(self) -> None:
        # A client that went away mid-stream still leaves its audit event.
        if not self._done:
            self._finish()
