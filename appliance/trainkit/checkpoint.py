"""Resumable checkpoints as bytes: the format, RNG state, (possibly sharded) weights and the resume checks.

A checkpoint is a ``torch.save`` of a dict of tensors and plain values, read
back with ``weights_only=True`` (no arbitrary unpickling), tagged with its
modality's format name. What must match for a resume to be exact (method,
resolved hyperparameters, data fingerprint, a step inside the run) is checked
by :func:`check_resume`. Weights and optimizer state are saved whole and laid
back out as the live parameters are (this rank's shard under FSDP, the tensor
itself otherwise), so one checkpoint format serves one process and many.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from appliance.errors import InvalidRequestError


class BinaryWriter(Protocol):
    """Where a checkpoint is serialised: anything with ``write`` and ``flush`` (no seeking needed)."""

    def write(self, data: bytes, /) -> Any: ...

    def flush(self) -> None: ...


#: Opens where the checkpoint of a step is written: ``with open_checkpoint(step) as fh: ...``.
CheckpointOpener = Callable[[int], AbstractContextManager[BinaryWriter]]


@dataclass(frozen=True)
class CheckpointFormat:
    """One modality's checkpoint format.

    Attributes:
        name: The ``format`` tag stored in every checkpoint (e.g. ``appliance.training.checkpoint/1``).
        noun: What an unreadable one is called in errors (``training checkpoint``).
    """

    name: str
    noun: str

    def dump(self, state: dict[str, Any]) -> bytes:
        """Serialise a checkpoint dict to bytes, in memory."""
        buf = io.BytesIO()
        self.dump_to(state, buf)
        return buf.getvalue()

    def dump_to(self, state: dict[str, Any], fh: BinaryWriter) -> None:
        """Serialise a checkpoint dict into ``fh`` as it is written (only sequential writes, no seeking)."""
        torch.save({"format": self.name, **state}, fh)

    def saver(self, on_checkpoint: Callable[[int, bytes], None] | None,
              open_checkpoint: CheckpointOpener | None) -> Callable[[int, dict[str, Any]], None] | None:
        """How a trainer hands over the checkpoint dict of a step, from the two ways a caller may take it.

        Args:
            on_checkpoint: Called with ``(step, checkpoint_bytes)``: simple, but the checkpoint is whole in memory.
            open_checkpoint: Called with the step; returns a context manager whose binary file the
                checkpoint is serialised into as it is written (a stream to the control plane), never whole
                in memory. At most one of the two may be given.
        """
        if on_checkpoint is not None and open_checkpoint is not None:
            raise ValueError("give `on_checkpoint` or `open_checkpoint`, not both")
        if open_checkpoint is not None:
            def stream(step: int, state: dict[str, Any]) -> None:
                with open_checkpoint(step) as fh:
                    self.dump_to(state, fh)
            return stream
        if on_checkpoint is not None:
            return lambda step, state: on_checkpoint(step, self.dump(state))
        return None

    def load(self, data: bytes, *, param: str = "resume_from") -> dict[str, Any]:
        """Read a checkpoint produced by :meth:`dump`.

        Raises:
            InvalidRequestError: The bytes are not a checkpoint of this format.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidRequestError(f"`{param}` must be checkpoint bytes; got {type(data).__name__}", param=param)
        try:
            state = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InvalidRequestError(f"`{param}` is not a readable {self.noun}: {exc}", param=param) from exc
        if not isinstance(state, dict) or state.get("format") != self.name:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise InvalidRequestError(
                f"`{param}` must be a checkpoint in format {self.name!r}; got {got!r}", param=param
            )
        return state


def check_resume(
    fmt: CheckpointFormat,
    data: bytes | None,
    *,
    method: str,
    hp: Any,
    data_fingerprint: str,
    total_steps: int,
    other_data: str,
    layout_only: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """The checkpoint ``data`` when this run can continue from it; ``None`` when there is none.

    Args:
        other_data: The problem to name when the data fingerprint differs
            (``it was trained on different data``).
        layout_only: Hyperparameters that only lay a step out in memory (how many
            micro-batches, activation checkpointing) without changing its maths: the
            memory plan may choose them differently on the resuming device.

    Raises:
        InvalidRequestError: Unreadable, or made by another method, hyperparameters,
            data, or at a step outside ``1..total_steps - 1`` (every problem named).
    """
    if data is None:
        return None
    state = fmt.load(data)
    problems = []
    if state.get("method") != method:
        problems.append(f"it was made by method {state.get('method')!r}, not {method!r}")
    def maths(values: Any) -> Any:
        return {k: v for k, v in values.items() if k not in layout_only} if isinstance(values, dict) else values

    if maths(state.get("hyperparameters")) != maths(hp.to_dict()):
        problems.append("its resolved hyperparameters differ from this job's")
    if state.get("data_fingerprint") != data_fingerprint:
        problems.append(other_data)
    if not 0 < state.get("step", 0) < total_steps:
        problems.append(f"its step {state.get('step')} is outside this run's 1..{total_steps - 1}")
    if problems:
        raise InvalidRequestError(f"`resume_from` cannot continue this run: {'; '.join(problems)}", param="resume_from")
    return state


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- weights, whole or sharded


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 shards parameters as DTensors)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor, on the CPU (a collective when sharded)."""
    whole = tensor.full_tensor() if is_sharded(tensor) else tensor
    return whole.detach().to("cpu").clone()


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (whole) laid out as ``param`` is: this rank's shard when ``param`` is sharded."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def full_weights(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of ``params`` by name (when sharded every rank must call this: it gathers)."""
    return {name: full(param) for name, param in params.items()}


def restore_weights(params: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Copy the checkpoint's whole ``saved`` tensors into the live (possibly sharded) trainable ``params``.

    Raises:
        InvalidRequestError: The checkpoint lacks one of ``params``.
    """
    missing = sorted(set(params) - set(saved))
    if missing:
        raise InvalidRequestError(f"`resume_from` lacks trainable weights such as {missing[0]!r}", param="resume_from")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(like(param, saved[name]))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors (the same on every rank, as one process saves it)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: full(v) if is_sharded(v) else v for k, v in entry.items()} for index, entry in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a :func:`full_optimizer_state` (or a one-process state) into a sharded or replicated optimizer."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(saved)
    state["state"] = {
        index: {k: like(params[int(index)], v) if torch.is_tensor(v) and v.shape == params[int(index)].shape else v
                for k, v in entry.items()}
        for index, entry in saved["state"].items()
    }
    optimizer.load_state_dict(state)
