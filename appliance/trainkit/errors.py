"""The errors both training modalities raise, and the small argument checks behind them."""

from __future__ import annotations

import math
from typing import Any

from appliance.errors import ApplianceError, InvalidFieldsError, InvalidRequestError


class HyperparameterError(InvalidFieldsError):
    """One or more hyperparameters are invalid; ``problems`` lists each as ``(param, message)``."""

    code = "invalid_hyperparameters"


class TrainingDivergedError(ApplianceError):
    """The loss became NaN or infinite; a lower learning rate usually helps."""

    code = "training_diverged"


class Cancelled(Exception):
    """``should_stop`` said so: the loop unwinds to return a ``cancelled`` result."""


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def require_positive_int(name: str, value: Any) -> None:
    """Raise naming ``name`` unless ``value`` is a positive integer (not a bool)."""
    if not is_positive_int(value):
        raise InvalidRequestError(f"`{name}` must be a positive integer; got {value!r}", param=name)


def check_finite_loss(loss: float | None, step: int, learning_rate: float, param: str) -> None:
    """Raise :class:`TrainingDivergedError` when the loss of step ``step + 1`` is NaN or infinite."""
    if loss is not None and not math.isfinite(loss):
        raise TrainingDivergedError(
            f"the training loss became {loss} at step {step + 1}; lower `learning_rate` (now {learning_rate:g})",
            param=param,
        )
