"""Resumable LLM training checkpoints as bytes (format: :mod:`appliance.trainkit.checkpoint`).

A checkpoint holds the adapter files, optimizer and scheduler state, RNG
state, the data position (optimizer steps done; the epoch order is a pure
function of the seed) and counters, plus what must match for a resume to be
exact: the method, the resolved hyperparameters and a fingerprint of the
tokenised data.
"""

from __future__ import annotations

from typing import Any

from appliance.trainkit.checkpoint import CheckpointFormat, check_resume

CHECKPOINT = CheckpointFormat("appliance.training.checkpoint/1", "training checkpoint")
FORMAT = CHECKPOINT.name
dump = CHECKPOINT.dump
load = CHECKPOINT.load


def checkpoint_adapter_files(data: bytes) -> dict[str, bytes]:
    """The adapter inside a checkpoint, as ``{filename: bytes}`` (servable like a final adapter)."""
    return dict(load(data, param="checkpoint")["adapter"])


def load_resume(data: bytes | None, method: str, hp: Any, data_fingerprint: str, total_steps: int) -> dict | None:
    """The checkpoint to resume from, checked against this run (:func:`~appliance.trainkit.checkpoint.check_resume`)."""
    return check_resume(CHECKPOINT, data, method=method, hp=hp, data_fingerprint=data_fingerprint,
                        total_steps=total_steps, other_data="it was trained on different data",
                        layout_only=("gradient_accumulation_steps", "gradient_checkpointing"))
