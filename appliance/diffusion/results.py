"""What an image training run reports: progress events, metrics and the final result.

No torch here: the API process can import these to type the worker's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from appliance.diffusion.hyperparameters import ImageHyperparameters
from appliance.trainkit.events import AsDict

#: How the subject-fidelity proxy is computed (also in the metrics, so a reader of a job cannot miss it).
FIDELITY_PROXY = (
    "proxy: colour-histogram intersection (RGB, 4x4x4 bins) of each generation for the instance prompt with "
    "the instance images' mean histogram, averaged; 1 = same colour distribution. A proxy, not CLIP-I/DINO: "
    "those are measured beside it when an evaluator model is imported"
)
#: What the learned figures are when no evaluator model is imported (the proxy is all there is).
NO_EVALUATOR = ("no CLIP or DINO evaluator model is imported: only the colour proxy above is measured; an admin "
                "imports one (a transformers CLIPModel, ViTModel or Dinov2Model folder) to get CLIP-I, CLIP-T and DINO")


@dataclass(frozen=True)
class ImageTrainingEvent:
    """Progress, passed to ``on_event``.

    ``type`` is ``train`` every few steps (and at the last step), ``validation``
    when validation images are made (``images`` holds one grid PNG), ``info``
    for phases (class images generated, fidelity measured) and ``warning``.

    Attributes:
        type: ``train``, ``validation``, ``info`` or ``warning``.
        step: Optimizer steps done so far.
        total_steps: Optimizer steps the run will take.
        train_loss: Mean training loss over the steps since the previous ``train`` event.
        learning_rate: Learning rate of the last step.
        images_per_second: Training images (instance plus class) per second since the previous event.
        message: Human-readable summary.
        images: ``{file name: PNG bytes}`` (``validation`` events).
    """

    type: Literal["train", "validation", "info", "warning"]
    step: int
    total_steps: int
    train_loss: float | None = None
    learning_rate: float | None = None
    images_per_second: float | None = None
    message: str = ""
    images: dict[str, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: images by name and size only (their bytes are for storage, not the event log)."""
        out = asdict(self)
        out["images"] = {name: len(data) for name, data in self.images.items()}
        return out


@dataclass(frozen=True)
class ImageTrainMetrics(AsDict):
    """Numbers for the job's result.

    The ``subject_fidelity_proxy_*`` figures are a pixel-statistics proxy (see
    :data:`FIDELITY_PROXY`), not a learned similarity: higher histogram scores
    and lower colour distances mean generations look more like the instance
    images in colour. ``*_after`` is ``None`` when the run was cancelled.
    """

    steps: int
    total_steps: int
    train_loss: float | None
    train_seconds: float
    images_per_second: float
    n_instance_images: int
    n_class_images: int
    subject_fidelity_proxy_color_histogram_before: float | None
    subject_fidelity_proxy_color_histogram_after: float | None
    subject_fidelity_proxy_mean_color_distance_before: float | None
    subject_fidelity_proxy_mean_color_distance_after: float | None
    subject_fidelity_metric: str = FIDELITY_PROXY
    clip_i_before: float | None = None
    clip_i_after: float | None = None
    dino_before: float | None = None
    dino_after: float | None = None
    clip_t_before: float | None = None
    clip_t_after: float | None = None
    fidelity_evaluators: dict[str, str] | None = None
    fidelity_metric: str = NO_EVALUATOR


@dataclass(frozen=True)
class ImageTrainResult:
    """The outcome of :func:`appliance.diffusion.train_images`.

    Attributes:
        status: ``succeeded``, or ``cancelled`` when ``should_stop`` said so.
        artifacts: ``{file name: bytes}``; ``None`` when cancelled. LoRA methods:
            ``pytorch_lora_weights.safetensors`` (diffusers format: write it into a
            directory and ``pipe.load_lora_weights(dir)``). DreamBooth:
            ``unet/config.json`` and ``unet/diffusion_pytorch_model.safetensors``,
            plus ``text_encoder/config.json`` and ``text_encoder/model.safetensors``
            with ``train_text_encoder`` (names are paths relative to a pipeline
            directory: written under the base model's layout they replace its UNet).
        images: ``{file name: PNG bytes}``: ``before_after.png`` (rows: the
            instance images, generations for the instance prompt before training,
            the same generations after; empty after-row when cancelled) and
            ``validation_step_NNNNNN.png`` for each validation.
        hyperparameters: The resolved hyperparameters (no ``"auto"`` left).
        metrics: See :class:`ImageTrainMetrics`.
        details: What the run chose (device, precision, prompts, prediction type, ...).
    """

    status: Literal["succeeded", "cancelled"]
    artifacts: dict[str, bytes] | None
    images: dict[str, bytes]
    hyperparameters: ImageHyperparameters
    metrics: ImageTrainMetrics
    details: dict[str, Any]
