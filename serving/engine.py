"""The engine interface, and the adapter bookkeeping both engines share.

Threading model: engines are synchronous and thread-safe. Every method may be
called from any thread; generation blocks only the calling thread (the
transformers engine computes on its own worker thread, the vLLM engine waits on
HTTP). A litestar app calls them from sync handlers (``sync_to_thread=True``)
and returns ``Stream(sse(chat_chunks(engine.stream(req), ...)))``: litestar
iterates a sync iterator on its thread pool, and closing the iterator when the
client goes away cancels the generation.

Adapters: :class:`AdapterRegistry` keeps the names an engine serves, a lock per
name (loads and unloads of one name are serialised; a request never sees a
half-loaded adapter), a pin count per adapter (an adapter in use by a request is
never evicted or freed under it), and a bound on resident adapters. Evicted
adapters stay registered and are reloaded on demand through the caller's
``adapter_source(name) -> {file: bytes}``: adapters are stored encrypted and
only the integrator can decrypt them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from serving.adapters import AdapterFiles, ValidatedAdapter
from serving.errors import (
    MODEL_NAME_LIKE,
    AdapterLoadError,
    AdapterNotFoundError,
    ConflictError,
    EngineError,
    echo,
    model_not_found,
)
from serving.protocol import Delta, GenerationRequest, GenerationResult, Usage

log = logging.getLogger("serving.engine")

__all__ = [
    "AdapterInfo",
    "AdapterRegistry",
    "AdapterSource",
    "Engine",
    "GenerationStream",
    "ImageEngine",
    "TextEngine",
]

#: Returns an adapter's files (decrypted, in memory) by name; raises if it has none.
AdapterSource = Callable[[str], Mapping[str, bytes]]


@dataclass(frozen=True)
class AdapterInfo:
    """What an engine knows about one registered adapter."""

    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    base_model: str | None
    size_bytes: int
    resident: bool
    #: How many times the weights were loaded (1 + reloads after eviction or replacement).
    loads: int = 1
    last_load_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "rank": self.rank, "alpha": self.alpha,
            "target_modules": list(self.target_modules) if isinstance(self.target_modules, tuple)
            else self.target_modules,
            "base_model": self.base_model, "size_bytes": self.size_bytes, "resident": self.resident,
            "loads": self.loads, "last_load_ms": round(self.last_load_ms, 2),
        }


@runtime_checkable
class Engine(Protocol):
    """What every engine implements, whatever it generates: one base model plus named fine-tunes.

    The protocol is the common lifecycle (adapters in and out, listing them,
    closing); what an engine generates differs too much to share a signature
    (chat turns and token streams, images from a prompt), so generation lives in
    the modality sub-protocols :class:`TextEngine` (transformers, vLLM) and
    :class:`ImageEngine` (diffusers). :mod:`serving.registry` builds engines of
    any kind by name; callers that generate check for the sub-protocol they need.
    """

    base_model_name: str

    def load_adapter(self, name: str, files: AdapterFiles | Path | None = None, *,
                     replace: bool = False) -> AdapterInfo:
        """Validate then load an adapter under ``name`` (``files=None``: fetch through ``adapter_source``).

        Raises:
            AdapterLoadError: validation or loading failed; the engine serves what it served before.
            ConflictError: ``name`` is loaded and ``replace`` is false, or no room and no ``adapter_source``.
        """
        ...

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter; waits for requests using it to finish. Raises AdapterNotFoundError."""
        ...

    def adapters(self) -> list[AdapterInfo]: ...

    def has_adapter(self, name: str) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class TextEngine(Engine, Protocol):
    """An engine answering OpenAI-shaped chat and text completion requests.

    ``request.model`` is either :attr:`base_model_name` or a registered adapter's name.

    ``isinstance(engine, TextEngine)`` reads every member before Python 3.12, and
    :attr:`max_context` of a vLLM engine asks a replica: do not call it on a hot path.
    """

    max_context: int

    def apply_chat_template(self, messages: list[dict[str, Any]] | list[Any]) -> str:
        """The prompt the base model's chat template makes of ``messages`` (generation prompt added)."""
        ...

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> GenerationStream: ...


@runtime_checkable
class ImageEngine(Engine, Protocol):
    """An engine generating images from a prompt (``POST /v1/images/generations``)."""

    def generate(self, prompt: str, *, model: str | None = None, n: int = 1, size: str | None = None,
                 seed: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | None = None) -> list[bytes]:
        """``n`` PNG images for ``prompt`` with the base model (``model=None``) or a fine-tune."""
        ...


class GenerationStream(Iterator[Delta]):
    """Iterator of :class:`Delta` for one request; ``usage`` is set once it is exhausted.

    Closing it early (``close()``, leaving a ``with`` block, or garbage collection)
    cancels the request, so an abandoned HTTP stream stops costing compute.
    """

    def __init__(self, model: str, events: Iterator[Delta | Usage], on_close: Callable[[], None] | None = None):
        self.model = model
        self.usage: Usage | None = None
        self.time_to_first_token_s: float = 0.0
        self._events = events
        self._on_close = on_close
        self._closed = False
        self._t0 = time.perf_counter()

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Delta:
        if self._closed:
            raise StopIteration
        try:
            while True:
                item = next(self._events)
                if isinstance(item, Usage):
                    self.usage = item
                    continue
                if not self.time_to_first_token_s and (item.text or item.finish_reason):
                    self.time_to_first_token_s = time.perf_counter() - self._t0
                return item
        except StopIteration:
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def collect(self) -> GenerationResult:
        """Drain the stream into a :class:`GenerationResult`."""
        from serving.protocol import Choice

        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        for d in self:
            texts.setdefault(d.index, []).append(d.text)
            if d.finish_reason is not None:
                finish[d.index] = d.finish_reason
        choices = [Choice(index=i, text="".join(texts[i]), finish_reason=finish.get(i, "stop"))  # type: ignore[arg-type]
                   for i in sorted(texts)]
        return GenerationResult(model=self.model, choices=choices, usage=self.usage or Usage(0, 0),
                                time_to_first_token_s=self.time_to_first_token_s)


def queue_events(q: queue.Queue[Any], timeout_s: float | None = None) -> Iterator[Any]:
    """Yield items from ``q`` until ``None``; re-raise an exception put into it."""
    while True:
        try:
            item = q.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineError(f"the engine produced nothing for {timeout_s} s; giving up on the request") from None
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# --------------------------------------------------------------------------- adapter registry

H = TypeVar("H")


@dataclass
class _Entry(Generic[H]):
    info: AdapterInfo
    handle: H | None
    pins: int = 0


@dataclass
class Pin(Generic[H]):
    """A resident adapter held for one request; release it when the request ends."""

    name: str
    handle: H
    _entry: _Entry[H] = field(repr=False)
    _registry: AdapterRegistry[H] = field(repr=False)
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._unpin(self._entry)


class AdapterRegistry(Generic[H]):
    """Names, per-name locks, pins and the resident-adapter LRU of one engine.

    Args:
        validate: Turns files into a :class:`ValidatedAdapter` (raises AdapterLoadError).
        load: Makes a validated adapter resident and returns the engine's handle for it.
        unload: Frees a handle. Called only when no request holds it.
        max_resident: Most adapters resident at once.
        source: Reloads an evicted adapter's files by name; without it, ``max_resident``
            is a hard limit on registered adapters.
        wait_s: How long a load waits for a busy adapter to free a resident slot.
    """

    def __init__(
        self,
        *,
        validate: Callable[[AdapterFiles | Path], ValidatedAdapter],
        load: Callable[[str, ValidatedAdapter], H],
        unload: Callable[[H], None],
        max_resident: int,
        source: AdapterSource | None = None,
        wait_s: float = 600.0,
    ) -> None:
        if max_resident < 1:
            raise ValueError(f"`max_resident_adapters` must be at least 1, got {max_resident}")
        self._validate = validate
        self._load = load
        self._unload = unload
        self.max_resident = max_resident
        self.source = source
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._entries: dict[str, _Entry[H]] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._name_locks: dict[str, threading.Lock] = {}

    # -- queries

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [replace(e.info, resident=e.handle is not None) for e in self._entries.values()]

    def resident_names(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._lru)

    # -- load / unload

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    def load(self, name: str, files: AdapterFiles | Path | None, *, replace: bool = False) -> AdapterInfo:
        with self._name_lock(name):
            with self._lock:
                old = self._entries.get(name)
            if old is not None and not replace:
                raise ConflictError(f"adapter {name!r} is already loaded; unload it first or pass replace=True",
                                    param="name")
            if files is None:
                files = self._fetch(name)
            validated = self._validate(files)
            handle, ms = self._make_resident(name, validated)
            info = AdapterInfo(
                name=name, rank=validated.rank, alpha=validated.alpha, target_modules=validated.target_modules,
                base_model=validated.base_model, size_bytes=validated.size_bytes, resident=True,
                loads=(old.info.loads + 1) if old else 1, last_load_ms=ms,
            )
            with self._lock:
                self._entries[name] = _Entry(info=info, handle=handle)
                self._lru[name] = None
                self._lru.move_to_end(name)
            if old is not None:
                self._free_when_idle(old)
            log.info("adapter loaded", extra={"adapter": name, "rank": info.rank, "load_ms": round(ms, 1)})
            return info

    def unload(self, name: str) -> None:
        with self._name_lock(name):
            with self._lock:
                entry = self._entries.pop(name, None)
                if entry is None:
                    raise AdapterNotFoundError(f"adapter {echo(name, MODEL_NAME_LIKE)} is not loaded", param="name")
                self._lru.pop(name, None)
            self._free_when_idle(entry)
        log.info("adapter unloaded", extra={"adapter": name})

    def close(self) -> None:
        for name in self.names():
            try:
                self.unload(name)
            except AdapterNotFoundError:
                pass

    # -- use by requests

    def pin(self, name: str) -> Pin[H]:
        """Hold adapter ``name`` resident for one request, reloading it if it was evicted.

        Raises:
            AdapterNotFoundError: no adapter has that name.
            AdapterLoadError: it was evicted and reloading it failed.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise model_not_found(name)
            if entry.handle is not None:
                return self._pin_locked(name, entry)
        with self._name_lock(name):
            with self._lock:
                entry = self._entries.get(name)
                if entry is None:
                    raise model_not_found(name)
                if entry.handle is not None:
                    return self._pin_locked(name, entry)
            validated = self._validate(self._fetch(name))
            handle, ms = self._make_resident(name, validated)
            with self._lock:
                entry.handle = handle
                entry.info = replace(entry.info, loads=entry.info.loads + 1, last_load_ms=ms)
                self._lru[name] = None
                log.info("adapter reloaded on demand", extra={"adapter": name, "load_ms": round(ms, 1)})
                return self._pin_locked(name, entry)

    def _pin_locked(self, name: str, entry: _Entry[H]) -> Pin[H]:
        entry.pins += 1
        self._lru.move_to_end(name)
        assert entry.handle is not None
        return Pin(name=name, handle=entry.handle, _entry=entry, _registry=self)

    def _unpin(self, entry: _Entry[H]) -> None:
        with self._cond:
            entry.pins -= 1
            self._cond.notify_all()

    # -- internals

    def _fetch(self, name: str) -> Mapping[str, bytes]:
        if self.source is None:
            raise AdapterLoadError(f"no files for adapter {name!r}: it was given none (or was evicted) and the "
                                   "engine has no adapter_source to fetch it from", param="model")
        try:
            return self.source(name)
        except AdapterLoadError:
            raise
        except Exception as exc:  # the integrator's loader: decryption, storage, ...
            raise AdapterLoadError(f"adapter_source could not provide adapter {name!r}: "
                                   f"{type(exc).__name__}: {exc}", param="model") from exc

    def _make_resident(self, name: str, validated: ValidatedAdapter) -> tuple[H, float]:
        self._make_room(exclude=name)
        t0 = time.perf_counter()
        try:
            handle = self._load(name, validated)
        except (AdapterLoadError, ConflictError, EngineError):
            raise
        except Exception as exc:
            log.exception("adapter load failed", extra={"adapter": name})
            raise AdapterLoadError(f"adapter {name!r} failed to load: {type(exc).__name__}: {exc}",
                                   param="name") from exc
        return handle, (time.perf_counter() - t0) * 1000

    def _make_room(self, exclude: str) -> None:
        # ``exclude``: the name being (re)loaded. While it is replaced, its old version stays resident
        # until its requests finish, so the bound may be exceeded by one for that time.
        deadline = time.monotonic() + self._wait_s
        while True:
            with self._cond:
                resident = [n for n in self._lru if n != exclude]
                if len(resident) < self.max_resident:
                    return
                if self.source is None:
                    raise ConflictError(
                        f"{self.max_resident} adapters are loaded, the most this engine keeps "
                        "(max_resident_adapters), and it has no adapter_source to reload evicted ones; "
                        "unload one first", param="name")
                victim = None
                for n in resident:
                    e = self._entries[n]
                    lock = self._name_locks[n]
                    if e.pins == 0 and lock.acquire(blocking=False):
                        victim = (n, e, lock)
                        break
                if victim is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EngineError(f"all {self.max_resident} resident adapters stayed busy for "
                                          f"{self._wait_s:.0f} s; cannot load another", param="model")
                    self._cond.wait(timeout=min(left, 1.0))
                    continue
                n, e, lock = victim
                handle, e.handle = e.handle, None
                self._lru.pop(n, None)
            try:
                if handle is not None:
                    self._unload(handle)
                log.info("adapter evicted", extra={"adapter": n})
            finally:
                lock.release()

    def _free_when_idle(self, entry: _Entry[H]) -> None:
        with self._cond:
            deadline = time.monotonic() + self._wait_s
            while entry.pins > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineError(f"adapter {entry.info.name!r} stayed in use for {self._wait_s:.0f} s",
                                      param="name")
                self._cond.wait(timeout=min(left, 1.0))
            handle, entry.handle = entry.handle, None
        if handle is not None:
            self._unload(handle)
