"""Model serving engines (embedded transformers engine, vLLM client) behind one interface.

- :mod:`serving.protocol`: OpenAI request/response shapes, validation, SSE chunks.
- :mod:`serving.engine`: the :class:`~serving.engine.Engine` protocol, adapter registry, streams.
- :mod:`serving.transformers_engine`: :class:`TransformersEngine`, the embedded CPU/GPU engine.
- :mod:`serving.vllm_engine`: :class:`VllmEngine`, a client of a vLLM OpenAI server.
- :mod:`serving.adapters`: adapter validation; :mod:`serving.errors`: the error tree and the one error body.
- :mod:`serving.registry`: engines by kind (transformers, vllm, diffusers); :mod:`serving.redact`: scrubbing.
- :mod:`serving.replicas`: several vLLM-protocol servers behind one :class:`VllmEngine`.
- :mod:`serving.vllm_server`: a vLLM-compatible server over any engine (tests, ``appliance serve-engine``).

The engines are imported from their modules (they pull in torch/transformers or httpx). The names
below are imported on first use, so that importing a light module (``serving.errors``,
``serving.redact``) does not import torch through this package.
"""

__all__ = [
    "AdapterInfo",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Delta",
    "Engine",
    "EngineError",
    "GenerationResult",
    "GenerationStream",
    "ImageEngine",
    "TextEngine",
    "Usage",
    "parse_chat_request",
    "parse_completion_request",
]

_HOME = {
    "AdapterInfo": "serving.engine", "Engine": "serving.engine", "GenerationStream": "serving.engine",
    "ImageEngine": "serving.engine", "TextEngine": "serving.engine",
    "AdapterLoadError": "serving.errors", "AdapterNotFoundError": "serving.errors", "EngineError": "serving.errors",
    **{name: "serving.protocol" for name in ("ChatCompletionRequest", "CompletionRequest", "Delta",
                                             "GenerationResult", "Usage", "parse_chat_request",
                                             "parse_completion_request")},
}


def __getattr__(name: str) -> object:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
