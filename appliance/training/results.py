"""What a training run reports: progress events, metrics and the final result.

No torch here: the API process can import these to type the worker's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.trainkit.events import AsDict
from appliance.training.hyperparameters import Hyperparameters


@dataclass(frozen=True)
class TrainingEvent(AsDict):
    """Progress, passed to ``on_event``.

    ``type`` is ``train`` every few steps (and at the last step), ``validation``
    after the before/after evaluations, ``info`` for a note on how the run
    trains (differential privacy), ``warning`` for data dropped.

    Attributes:
        type: ``train``, ``validation``, ``info`` or ``warning``.
        step: Optimizer steps done so far.
        total_steps: Optimizer steps the run will take.
        epoch: Epochs done, fractional (``step / steps_per_epoch``).
        train_loss: Mean training loss over the steps since the previous ``train`` event.
        valid_loss: Validation loss (``validation`` events).
        learning_rate: Learning rate of the last step.
        tokens_per_second: Non-padding tokens trained per second since the previous event.
        trained_tokens: Non-padding tokens trained so far (epochs counted).
        message: Human-readable summary.
        phase: A post-training phase's progress (canary exposure, extraction probe): ``{"name", "done",
            "total", "seconds_left"}``, on ``info`` events; the job lists show it once training is done.
    """

    type: Literal["train", "validation", "info", "warning"]
    step: int
    total_steps: int
    epoch: float
    train_loss: float | None = None
    valid_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    trained_tokens: int = 0
    message: str = ""
    phase: dict[str, Any] | None = None


@dataclass(frozen=True)
class TrainMetrics(AsDict):
    """Numbers for the job's result.

    Validation figures are ``None`` when there is no validation data (a single
    training record and no validation records).
    """

    valid_loss_before: float | None
    valid_perplexity_before: float | None
    valid_loss_after: float | None
    valid_perplexity_after: float | None
    train_loss: float | None
    steps: int
    total_steps: int
    trained_tokens: int
    train_seconds: float
    tokens_per_second: float
    n_train_examples: int
    n_valid_examples: int
    dropped_examples: int


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`appliance.training.train`.

    Attributes:
        status: ``succeeded``, or ``cancelled`` when ``should_stop`` said so.
        adapter: ``{filename: bytes}`` of a PEFT adapter directory; ``None`` when cancelled.
        hyperparameters: The resolved hyperparameters (no ``"auto"`` left).
        metrics: See :class:`TrainMetrics`; after-training figures are ``None`` when cancelled.
        details: What the recipe chose (precision, quantisation, ...).
        privacy: Privacy reports by kind: ``privacy["dp"]`` when the run was
            differentially private (:func:`appliance.training.dp.DpTraining.report`);
            ``canaries`` (exposure) and ``extraction`` (probe counts) from
            :mod:`appliance.training.memorization`, when asked for.
        samples: A few validation prompts with the reference answer and the greedy answers
            before and after training (:mod:`appliance.training.samples`); validation text, so
            the worker sends them as an encrypted result file.
    """

    status: Literal["succeeded", "cancelled"]
    adapter: dict[str, bytes] | None
    hyperparameters: Hyperparameters
    metrics: TrainMetrics
    details: dict[str, Any]
    privacy: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
