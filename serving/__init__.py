"""Model serving engines (embedded transformers engine, vLLM client) behind one interface.

- :mod:`serving.protocol`: OpenAI request/response shapes, validation, SSE chunks.
- :mod:`serving.engine`: the :class:`~serving.engine.Engine` protocol, adapter registry, streams.
- :mod:`serving.transformers_engine`: :class:`TransformersEngine`, the embedded CPU/GPU engine.
- :mod:`serving.vllm_engine`: :class:`VllmEngine`, a client of a vLLM OpenAI server.
- :mod:`serving.adapters`: adapter validation; :mod:`serving.errors`: the errors engines raise.
- :mod:`serving.replicas`: several vLLM-protocol servers behind one :class:`VllmEngine`.
- :mod:`serving.vllm_server`: a vLLM-compatible server over any engine (tests, ``appliance serve-engine``).

The engines are imported from their modules (they pull in torch/transformers or httpx).
"""

from serving.engine import AdapterInfo, Engine, GenerationStream
from serving.errors import AdapterLoadError, AdapterNotFoundError, EngineError
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    GenerationResult,
    Usage,
    parse_chat_request,
    parse_completion_request,
)

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
    "Usage",
    "parse_chat_request",
    "parse_completion_request",
]
