"""Engines by kind: a name -> factory registry, so callers pick an engine without knowing its class.

Built in: ``"transformers"`` (the embedded text engine), ``"vllm"`` (a client of
vLLM-protocol servers) and ``"diffusers"`` (the image engine). Every factory
takes one :class:`EngineSpec` and returns an object implementing
:class:`serving.engine.Engine` (checked): text engines also implement
:class:`~serving.engine.TextEngine`, image engines :class:`~serving.engine.ImageEngine`.
The built-in factories import their engine module only when called (torch,
transformers, diffusers or httpx are heavy).

Another kind is added with :func:`register_engine`::

    @register_engine("llama-cpp")
    def _llama_cpp(spec: EngineSpec) -> Engine: ...

    engine = create_engine("llama-cpp", EngineSpec(model_dir, name="tiny"))
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine module imports torch; annotations only
    from serving.engine import AdapterSource, Engine

__all__ = ["EngineFactory", "EngineSpec", "create_engine", "engine_kinds", "register_engine"]


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is started with. A field a kind does not use is ignored (only vLLM has replicas).

    Args:
        model_dir: The base model's directory (vLLM: the local copy, read for its config and tokenizer).
        name: The base model's name in requests; defaults to the directory's name.
        device: ``"cpu"``, ``"cuda"``...; ``None`` picks CUDA when available (embedded engines).
        adapter_source: Returns a fine-tune's files by name, to (re)load adapters on demand.
        max_resident_adapters: Most adapters resident at once.
        max_lora_rank: Largest adapter rank accepted.
        replica_urls: vLLM: the base URLs of the serving replicas.
        shm_dir: vLLM: where adapters are written for the replicas to read (a tmpfs).
        api_key_file: vLLM: a file holding the replicas' bearer token (read when the engine starts).
    """

    model_dir: str | Path
    name: str | None = None
    device: str | None = None
    adapter_source: AdapterSource | None = None
    max_resident_adapters: int = 8
    max_lora_rank: int = 64
    replica_urls: Sequence[str] = ()
    shm_dir: str | Path = "/dev/shm"
    api_key_file: Path | None = None

    @property
    def base_name(self) -> str:
        return self.name or Path(self.model_dir).name


EngineFactory = Callable[[EngineSpec], "Engine"]

_lock = threading.Lock()
_factories: dict[str, EngineFactory] = {}


def register_engine(kind: str, factory: EngineFactory | None = None, *, replace: bool = False
                    ) -> Callable[[EngineFactory], EngineFactory] | EngineFactory:
    """Register ``factory`` under ``kind`` (or use as a decorator: ``@register_engine("kind")``).

    Raises:
        ValueError: ``kind`` is taken and ``replace`` is false.
    """
    def add(f: EngineFactory) -> EngineFactory:
        with _lock:
            if kind in _factories and not replace:
                raise ValueError(f"an engine kind {kind!r} is already registered; pass replace=True to replace it")
            _factories[kind] = f
        return f

    return add if factory is None else add(factory)


def engine_kinds() -> list[str]:
    """The registered kinds, sorted."""
    with _lock:
        return sorted(_factories)


def create_engine(kind: str, spec: EngineSpec) -> Engine:
    """Start an engine of ``kind`` for ``spec``.

    Raises:
        ValueError: No engine of that kind is registered.
        TypeError: The factory returned something that does not implement :class:`~serving.engine.Engine`.
    """
    from serving.engine import Engine

    with _lock:
        factory = _factories.get(kind)
    if factory is None:
        raise ValueError(f"no engine kind {kind!r}; registered: {', '.join(engine_kinds())}")
    engine = factory(spec)
    if not isinstance(engine, Engine):
        raise TypeError(f"the {kind!r} engine factory returned {type(engine).__name__}, "
                        "which does not implement serving.engine.Engine")
    return engine


# --------------------------------------------------------------------------- built-in kinds


@register_engine("transformers")
def _transformers(spec: EngineSpec) -> Engine:
    from serving.transformers_engine import EngineConfig, TransformersEngine

    return TransformersEngine.from_pretrained(
        Path(spec.model_dir), name=spec.base_name, device=spec.device, adapter_source=spec.adapter_source,
        config=EngineConfig(max_resident_adapters=spec.max_resident_adapters, max_lora_rank=spec.max_lora_rank),
    )


@register_engine("diffusers")
def _diffusers(spec: EngineSpec) -> Engine:
    from serving.diffusers_engine import DiffusersEngine, DiffusersEngineConfig

    return DiffusersEngine.from_pretrained(
        Path(spec.model_dir), name=spec.base_name, device=spec.device, adapter_source=spec.adapter_source,
        config=DiffusersEngineConfig(max_resident_adapters=spec.max_resident_adapters,
                                     max_lora_rank=spec.max_lora_rank),
    )


@register_engine("vllm")
def _vllm(spec: EngineSpec) -> Engine:
    from serving.vllm_engine import VllmEngine

    return VllmEngine(
        list(spec.replica_urls), base_model_name=spec.base_name, base_model_dir=spec.model_dir,
        adapter_source=spec.adapter_source, max_resident_adapters=spec.max_resident_adapters,
        max_lora_rank=spec.max_lora_rank, shm_dir=spec.shm_dir,
        api_key=spec.api_key_file.read_text().strip() if spec.api_key_file else None,
    )
