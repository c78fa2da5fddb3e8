"""Resumable image-training checkpoints as bytes (format: :mod:`appliance.trainkit.checkpoint`).

A checkpoint holds the trainable tensors, optimizer, learning-rate scheduler
and gradient-scaler state, RNG state, the step, the recent losses, the
"before" generations and metrics, and what must match for an exact resume:
the method, the resolved hyperparameters and a fingerprint of the data and
prompts. The data order and the noise of step ``k`` are pure functions of
``(seed, k)``, so nothing else is needed to continue bit for bit.
"""

from __future__ import annotations

from typing import Any

from appliance.trainkit.checkpoint import CheckpointFormat, check_resume

CHECKPOINT = CheckpointFormat("appliance.diffusion.checkpoint/1", "image-training checkpoint")
FORMAT = CHECKPOINT.name
dump = CHECKPOINT.dump
load = CHECKPOINT.load


def checkpoint_artifacts(data: bytes) -> dict[str, bytes]:
    """The artefact a checkpoint holds, as ``{file name: bytes}`` (servable like a final one)."""
    from appliance.diffusion.registry import get_recipe

    state = load(data, param="checkpoint")
    return get_recipe(state["method"]).artifacts_from_checkpoint(state["payload"], state["trainable"])


def load_resume(data: bytes | None, method: str, hp: Any, fingerprint: str, total_steps: int) -> dict | None:
    """The checkpoint to resume from, checked against this run (:func:`~appliance.trainkit.checkpoint.check_resume`)."""
    return check_resume(CHECKPOINT, data, method=method, hp=hp, data_fingerprint=fingerprint,
                        total_steps=total_steps, other_data="it was trained on different images or prompts")
