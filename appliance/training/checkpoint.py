"""Resumable checkpoints as bytes.

A checkpoint is a ``torch.save`` of a dict of tensors and plain values, read
back with ``weights_only=True`` (no arbitrary unpickling). It holds the
adapter files, optimizer and scheduler state, RNG state, the data position
(optimizer steps done; the epoch order is a pure function of the seed) and
counters, plus what must match for a resume to be exact: the method, the
resolved hyperparameters and a fingerprint of the tokenised data.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from appliance.errors import InvalidRequestError

FORMAT = "appliance.training.checkpoint/1"


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
        raise InvalidRequestError(f"`{param}` is not a readable training checkpoint: {exc}", param=param) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InvalidRequestError(f"`{param}` must be a checkpoint in format {FORMAT!r}; got {got!r}", param=param)
    return state


def checkpoint_adapter_files(data: bytes) -> dict[str, bytes]:
    """The adapter inside a checkpoint, as ``{filename: bytes}`` (servable like a final adapter)."""
    return dict(load(data, param="checkpoint")["adapter"])


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
