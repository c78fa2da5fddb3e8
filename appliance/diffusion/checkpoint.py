"""Resumable image-training checkpoints as bytes.

As on the LLM side (:mod:`appliance.training.checkpoint`): a ``torch.save`` of
plain values and tensors, read back with ``weights_only=True`` (no arbitrary
unpickling). It holds the trainable tensors, optimizer, learning-rate
scheduler and gradient-scaler state, RNG state, the step, the recent losses,
the "before" generations and metrics, and what must match for an exact resume:
the method, the resolved hyperparameters and a fingerprint of the data and
prompts. The data order and the noise of step ``k`` are pure functions of
``(seed, k)``, so nothing else is needed to continue bit for bit.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from appliance.errors import InvalidRequestError

FORMAT = "appliance.diffusion.checkpoint/1"


def dump(state: dict[str, Any]) -> bytes:
    """Serialise a checkpoint dict to bytes, in memory."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    return buf.getvalue()


def load(data: bytes, *, param: str = "resume_from") -> dict[str, Any]:
    """Read a checkpoint produced by :func:`dump`.

    Raises:
        InvalidRequestError: The bytes are not a checkpoint of this format.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequestError(f"`{param}` must be checkpoint bytes; got {type(data).__name__}", param=param)
    try:
        state = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidRequestError(f"`{param}` is not a readable image-training checkpoint: {exc}", param=param) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InvalidRequestError(f"`{param}` must be a checkpoint in format {FORMAT!r}; got {got!r}", param=param)
    return state


def checkpoint_artifacts(data: bytes) -> dict[str, bytes]:
    """The artefact a checkpoint holds, as ``{file name: bytes}`` (servable like a final one)."""
    from appliance.diffusion.registry import get_recipe

    state = load(data, param="checkpoint")
    return get_recipe(state["method"]).artifacts_from_checkpoint(state["payload"], state["trainable"])


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
