"""Stable Diffusion fine-tuning (LoRA, DreamBooth, DreamBooth+LoRA) on in-memory image datasets.

Light names (hyperparameters, spec, results) import without torch, so the API
process can validate jobs cheaply; :func:`train_images`, the importer, the
tiny test pipeline and the checkpoint helpers load torch and diffusers on first use.

Typical use::

    spec = ImageTrainingSpec.from_method(job["method"])
    result = train_images(spec, model_dir, dataset_zip_bytes,
                          on_event=..., on_checkpoint=..., should_stop=...)
    result.artifacts  # {"pytorch_lora_weights.safetensors": b"..."} or {"unet/config.json": ..., ...}
    result.images     # {"before_after.png": b"...", "validation_step_000100.png": b"...", ...}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.diffusion.hyperparameters import (
    HYPERPARAMETERS,
    DreamBoothHyperparameters,
    DreamBoothLoraHyperparameters,
    HyperparameterError,
    ImageLoraHyperparameters,
    ImageTrainingSpec,
    resolve,
)
from appliance.diffusion.results import FIDELITY_PROXY, ImageTrainingEvent, ImageTrainMetrics, ImageTrainResult
from appliance.trainkit.errors import TrainingDivergedError
from appliance.trainkit.lazy import lazy_attributes

if TYPE_CHECKING:
    from appliance.diffusion.checkpoint import checkpoint_artifacts
    from appliance.diffusion.data import ImageDatasetError, build_dataset_zip, read_image_dataset
    from appliance.diffusion.importer import DiffusionModelInfo, import_diffusers_model
    from appliance.diffusion.tiny import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
    from appliance.diffusion.trainer import train_images

__all__ = [
    "FIDELITY_PROXY",
    "HYPERPARAMETERS",
    "DiffusionModelInfo",
    "DreamBoothHyperparameters",
    "DreamBoothLoraHyperparameters",
    "HyperparameterError",
    "ImageDatasetError",
    "ImageLoraHyperparameters",
    "ImageTrainMetrics",
    "ImageTrainResult",
    "ImageTrainingEvent",
    "ImageTrainingSpec",
    "TrainingDivergedError",
    "build_dataset_zip",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "checkpoint_artifacts",
    "import_diffusers_model",
    "read_image_dataset",
    "resolve",
    "train_images",
]

__getattr__ = lazy_attributes(__name__, {
    "train_images": "appliance.diffusion.trainer",
    "checkpoint_artifacts": "appliance.diffusion.checkpoint",
    "ImageDatasetError": "appliance.diffusion.data",
    "build_dataset_zip": "appliance.diffusion.data",
    "read_image_dataset": "appliance.diffusion.data",
    "DiffusionModelInfo": "appliance.diffusion.importer",
    "import_diffusers_model": "appliance.diffusion.importer",
    "build_tiny_sd_pipeline": "appliance.diffusion.tiny",
    "build_tiny_sdxl_pipeline": "appliance.diffusion.tiny",
})
