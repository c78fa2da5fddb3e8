"""LLM fine-tuning recipes (LoRA, QLoRA) over in-memory records.

Light names (hyperparameters, spec, results) import without torch, so the API
process can validate jobs cheaply; :func:`train` and the checkpoint helpers
load torch, transformers and peft on first use.

Typical use::

    spec = TrainingSpec.from_method(job["method"])
    result = train(spec, model_dir, train_records, val_records,
                   on_event=..., on_checkpoint=..., should_stop=...)
    result.adapter  # {"adapter_config.json": b"...", "adapter_model.safetensors": b"..."}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.trainkit.errors import TrainingDivergedError
from appliance.trainkit.lazy import lazy_attributes
from appliance.training.data import TrainingDataError
from appliance.training.hyperparameters import (
    HYPERPARAMETERS,
    DifferentialPrivacy,
    HyperparameterError,
    LoraHyperparameters,
    QloraHyperparameters,
    TrainingSpec,
    resolve,
)
from appliance.training.results import TrainingEvent, TrainMetrics, TrainResult

if TYPE_CHECKING:
    from appliance.training.checkpoint import checkpoint_adapter_files
    from appliance.training.trainer import train

__all__ = [
    "HYPERPARAMETERS",
    "DifferentialPrivacy",
    "HyperparameterError",
    "LoraHyperparameters",
    "QloraHyperparameters",
    "TrainMetrics",
    "TrainResult",
    "TrainingDataError",
    "TrainingDivergedError",
    "TrainingEvent",
    "TrainingSpec",
    "checkpoint_adapter_files",
    "resolve",
    "train",
]

__getattr__ = lazy_attributes(__name__, {
    "train": "appliance.training.trainer",
    "checkpoint_adapter_files": "appliance.training.checkpoint",
})
