"""Hyperparameters of the image training methods, validated in full and resolved from ``"auto"``.

A job carries ``method: {"type": "dreambooth", "dreambooth": {"hyperparameters": {...}}}``
as on the LLM side (:mod:`appliance.training.hyperparameters`).
:meth:`ImageTrainingSpec.from_method` parses it; validation reports *all*
problems at once, each naming ``method.<type>.hyperparameters.<field>`` and the
value received. No torch here: the API process validates jobs cheaply.

Defaults are those of diffusers' example scripts (``examples/text_to_image/
train_text_to_image_lora.py`` for ``lora``, ``examples/dreambooth/train_dreambooth.py``
for ``dreambooth``, ``examples/dreambooth/train_dreambooth_lora.py`` for
``dreambooth_lora``). ``"auto"`` resolves (:func:`resolve`, once the base model
and the data are known) to:

==========================  ====================  ====================  ====================
field                       lora                  dreambooth            dreambooth_lora
==========================  ====================  ====================  ====================
resolution                  the base model's default image size (UNet ``sample_size`` x VAE
                            scale factor: 512 for SD 1.x, 768 for SD 2.x-768, 1024 for SDXL;
                            the scripts' fixed default is 512)
max_train_steps             100 epochs            400 (the README's     500 (the README's
                            (``num_train_epochs``  DreamBooth command)    LoRA command)
                            100), in steps
learning_rate               1e-4                  5e-6                  5e-4
rank                        4                     -                     4
train_batch_size            16                    4                     4
gradient_accumulation_steps 1                     1                     1
prior_loss_weight           -                     1.0                   1.0
num_class_images            -                     100, or as many as    the same
                                                  were uploaded
                                                  (``class_images_file``)
mixed_precision             ``bf16`` on a CUDA device with bf16, else ``no``
gradient_checkpointing      the memory plan's choice (``--gradient_checkpointing``: recompute the UNet's, and a
                            trained text encoder's, activations in the backward pass; less memory, slower steps)
use_8bit_adam               the memory plan's choice (``--use_8bit_adam``: bitsandbytes' 8-bit AdamW, optimizer
                            state in a quarter of the memory). The plan (:mod:`appliance.diffusion.planner`,
                            made when the job is created) turns neither on when the job fits without them,
                            else checkpointing, then 8-bit Adam too (only on a GPU with bitsandbytes); the
                            worker substitutes its choice for ``"auto"``. Without a plan, ``"auto"`` is off.
checkpoint_every_steps      500 (``--checkpointing_steps``); 0 = never
validation_every_steps      100 (``--validation_steps``); 0 = never
==========================  ====================  ====================  ====================

Other fields: ``instance_prompt`` (``None``: the dataset's), ``class_prompt``
(``None``: no prior preservation; setting it turns prior preservation on, the
scripts' ``--with_prior_preservation``), ``train_text_encoder`` (``False``),
``snr_gamma`` (``None``: plain MSE; the scripts recommend 5.0), ``seed`` (0;
the scripts default to unseeded, a job here is always reproducible),
``evaluation_prompts`` (``None``: DreamBooth-style templates on the instance
prompt, :data:`appliance.diffusion.evaluation.DEFAULT_PROMPT_TEMPLATES`; prompts
never trained on, for CLIP-T and the generations CLIP-I/DINO score when an
evaluator model is imported).

Fixed as in the scripts (not job options): AdamW (betas 0.9/0.999, weight
decay 1e-2, eps 1e-8), constant learning rate, gradient clipping at 1.0, LoRA
``lora_alpha = rank`` with Gaussian init on ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` (plus ``add_k_proj``/``add_v_proj`` where present) and, with
``train_text_encoder``, ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from appliance.trainkit.errors import HyperparameterError
from appliance.trainkit.hyperparameters import AUTO, Auto, FieldChecks, check_spec, parse_method
from appliance.trainkit.hyperparameters import is_int as _is_int
from appliance.trainkit.hyperparameters import prefix as _prefix
from appliance.trainkit.hyperparameters import raise_if as _raise_if
from appliance.trainkit.registry import RecipeCapabilities

__all__ = ["AUTO", "COMMON_DEFAULTS", "DEFAULTS", "HYPERPARAMETERS", "Auto", "DreamBoothHyperparameters",
           "DreamBoothLoraHyperparameters", "HyperparameterError", "ImageHyperparameters",
           "ImageLoraHyperparameters", "ImageTrainingSpec", "hyperparameters_from_dict", "resolve",
           "uses_prior_preservation"]

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
ImageMethod = Literal["lora", "dreambooth", "dreambooth_lora"]

MAX_PROMPT_CHARS = 1000
#: At most this many held-out evaluation prompts (each costs a few generations before and after training).
MAX_EVALUATION_PROMPTS = 25

#: Per-method defaults behind ``"auto"`` (see the module docstring for sources).
DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"learning_rate": 1e-4, "rank": 4, "train_batch_size": 16, "num_train_epochs": 100},
    "dreambooth": {"learning_rate": 5e-6, "train_batch_size": 4, "max_train_steps": 400},
    "dreambooth_lora": {"learning_rate": 5e-4, "rank": 4, "train_batch_size": 4, "max_train_steps": 500},
}
COMMON_DEFAULTS: dict[str, Any] = {
    "gradient_accumulation_steps": 1,
    "prior_loss_weight": 1.0,
    "num_class_images": 100,
    "checkpoint_every_steps": 500,
    "validation_every_steps": 100,
}


@dataclass(frozen=True)
class ImageLoraHyperparameters:
    """LoRA on the UNet's attention (and optionally the text encoder), trained on captioned images.

    Each image is paired with its caption; images without one use the
    instance prompt. Every field is validated on construction, all problems
    at once (:class:`HyperparameterError`).
    """

    resolution: int | Auto = AUTO
    max_train_steps: int | Auto = AUTO
    learning_rate: float | Auto = AUTO
    rank: int | Auto = AUTO
    train_batch_size: int | Auto = AUTO
    gradient_accumulation_steps: int | Auto = AUTO
    instance_prompt: str | None = None
    train_text_encoder: bool = False
    snr_gamma: float | None = None
    mixed_precision: MixedPrecision = AUTO
    gradient_checkpointing: bool | Auto = AUTO
    use_8bit_adam: bool | Auto = AUTO
    seed: int = 0
    checkpoint_every_steps: int | Auto = AUTO
    validation_every_steps: int | Auto = AUTO
    evaluation_prompts: list[str] | None = None

    method = "lora"
    capabilities: ClassVar[RecipeCapabilities] = RecipeCapabilities(output="adapter")

    def __post_init__(self) -> None:
        _raise_if(_check(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DreamBoothHyperparameters:
    """Full fine-tune of the UNet (and optionally the text encoder) on a subject's images.

    Every image is paired with the instance prompt. With ``class_prompt``,
    ``num_class_images`` images of the class (uploaded ones first, then images the base model
    generates) are trained on alongside (prior preservation, weighted by ``prior_loss_weight``).
    """

    resolution: int | Auto = AUTO
    max_train_steps: int | Auto = AUTO
    learning_rate: float | Auto = AUTO
    train_batch_size: int | Auto = AUTO
    gradient_accumulation_steps: int | Auto = AUTO
    prior_loss_weight: float | Auto | None = AUTO
    num_class_images: int | Auto | None = AUTO
    class_prompt: str | None = None
    instance_prompt: str | None = None
    train_text_encoder: bool = False
    snr_gamma: float | None = None
    mixed_precision: MixedPrecision = AUTO
    gradient_checkpointing: bool | Auto = AUTO
    use_8bit_adam: bool | Auto = AUTO
    seed: int = 0
    checkpoint_every_steps: int | Auto = AUTO
    validation_every_steps: int | Auto = AUTO
    evaluation_prompts: list[str] | None = None

    method = "dreambooth"
    capabilities: ClassVar[RecipeCapabilities] = RecipeCapabilities(output="full_weights")

    def __post_init__(self) -> None:
        _raise_if(_check(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DreamBoothLoraHyperparameters:
    """DreamBooth (instance prompt, optional prior preservation) training a LoRA instead of the whole UNet."""

    resolution: int | Auto = AUTO
    max_train_steps: int | Auto = AUTO
    learning_rate: float | Auto = AUTO
    rank: int | Auto = AUTO
    train_batch_size: int | Auto = AUTO
    gradient_accumulation_steps: int | Auto = AUTO
    prior_loss_weight: float | Auto | None = AUTO
    num_class_images: int | Auto | None = AUTO
    class_prompt: str | None = None
    instance_prompt: str | None = None
    train_text_encoder: bool = False
    snr_gamma: float | None = None
    mixed_precision: MixedPrecision = AUTO
    gradient_checkpointing: bool | Auto = AUTO
    use_8bit_adam: bool | Auto = AUTO
    seed: int = 0
    checkpoint_every_steps: int | Auto = AUTO
    validation_every_steps: int | Auto = AUTO
    evaluation_prompts: list[str] | None = None

    method = "dreambooth_lora"
    capabilities: ClassVar[RecipeCapabilities] = RecipeCapabilities(output="adapter")

    def __post_init__(self) -> None:
        _raise_if(_check(self))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ImageHyperparameters = Union[ImageLoraHyperparameters, DreamBoothHyperparameters, DreamBoothLoraHyperparameters]

#: ``method.type`` -> its hyperparameters class (the recipe registry holds the code).
HYPERPARAMETERS: dict[str, type] = {
    "lora": ImageLoraHyperparameters,
    "dreambooth": DreamBoothHyperparameters,
    "dreambooth_lora": DreamBoothLoraHyperparameters,
}


@dataclass(frozen=True)
class ImageTrainingSpec:
    """What to train on images: the method and its hyperparameters (:meth:`from_method`)."""

    method: ImageMethod
    hyperparameters: ImageHyperparameters

    def __post_init__(self) -> None:
        check_spec(self.method, self.hyperparameters, HYPERPARAMETERS)

    @classmethod
    def from_method(cls, method: Mapping[str, Any] | None) -> ImageTrainingSpec:
        """Parse ``{"type": "dreambooth", "dreambooth": {"hyperparameters": {...}}}``.

        A missing ``method`` means ``lora`` with every hyperparameter at its
        default. Unknown keys are errors (a misspelt ``lora_rank`` must not be
        silently ignored).

        Raises:
            HyperparameterError: Listing every problem found.
        """
        def unknown(kind: str, key: str, known: set[str]) -> str:
            return f"is not a known hyperparameter of {kind!r}; known: {', '.join(sorted(known))}"

        return cls(*parse_method(method, HYPERPARAMETERS, default="lora", unknown=unknown))


def resolve(
    hp: ImageHyperparameters,
    *,
    n_images: int,
    default_resolution: int,
    n_class_images: int | None = None,
    size_multiple: int = 8,
    device_type: str = "cpu",
    bf16_supported: bool = False,
) -> ImageHyperparameters:
    """Replace every ``"auto"`` with a concrete value (rules in the module docstring) and check against the model.

    Args:
        hp: Validated hyperparameters.
        n_images: Instance (training) images in the dataset.
        n_class_images: Uploaded class images, if any: "auto" ``num_class_images`` becomes their count.
        default_resolution: The base model's default image size in pixels.
        size_multiple: Pixel sizes must be multiples of this (the VAE's scale factor).
        device_type: ``cpu`` or ``cuda``.
        bf16_supported: Whether the CUDA device computes in bfloat16.

    Raises:
        HyperparameterError: A value does not fit the model or the device.
    """
    method = hp.method
    defaults = {**COMMON_DEFAULTS, **DEFAULTS[method]}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(hp):
        if getattr(hp, f.name) == AUTO and f.name in defaults:
            values[f.name] = defaults[f.name]
    if not uses_prior_preservation(hp):
        values.update({f: None for f in ("prior_loss_weight", "num_class_images") if hasattr(hp, f)})
    elif n_class_images and getattr(hp, "num_class_images", None) == AUTO:
        values["num_class_images"] = n_class_images
    if hp.resolution == AUTO:
        values["resolution"] = default_resolution
    if hp.max_train_steps == AUTO and "num_train_epochs" in defaults:  # the method's default is in epochs
        batch = values.get("train_batch_size", hp.train_batch_size)
        accumulation = values.get("gradient_accumulation_steps", hp.gradient_accumulation_steps)
        values["max_train_steps"] = defaults["num_train_epochs"] * math.ceil(max(1, n_images) / (batch * accumulation))
    if hp.mixed_precision == AUTO:
        values["mixed_precision"] = "bf16" if device_type == "cuda" and bf16_supported else "no"
    for field in ("gradient_checkpointing", "use_8bit_adam"):  # still "auto": no memory plan chose, so off
        if getattr(hp, field) == AUTO:
            values[field] = False
    resolved = dataclasses.replace(hp, **values)

    prefix = _prefix(method)
    problems = []
    if resolved.resolution % size_multiple:
        problems.append((f"{prefix}.resolution", f"must be a multiple of {size_multiple} for this model; "
                                                 f"got {resolved.resolution}"))
    if resolved.mixed_precision == "fp16" and device_type != "cuda":
        problems.append((f"{prefix}.mixed_precision", f"'fp16' needs a CUDA device (this run is on {device_type}); "
                                                      "use 'no' or 'bf16'"))
    if resolved.mixed_precision == "bf16" and device_type == "cuda" and not bf16_supported:
        problems.append((f"{prefix}.mixed_precision", "'bf16' is not supported by this GPU; use 'fp16' or 'no'"))
    _raise_if(problems)
    return resolved


def hyperparameters_from_dict(method: str, values: Mapping[str, Any]) -> ImageHyperparameters:
    """Rebuild hyperparameters from :meth:`to_dict` output (e.g. stored with a job)."""
    return HYPERPARAMETERS[method](**values)


def uses_prior_preservation(hp: ImageHyperparameters) -> bool:
    """Whether a run trains on generated class images as well (``class_prompt`` set)."""
    return getattr(hp, "class_prompt", None) is not None


def _check(hp: ImageHyperparameters) -> list[tuple[str, str]]:
    """Every problem with ``hp``, in field order."""
    check = FieldChecks(hp, at_least="an integer from")
    fields, bad, int_in, number = check.fields, check.bad, check.int_in, check.number

    def prompt(field: str) -> None:
        if field not in fields:
            return
        value = getattr(hp, field)
        if value is None:
            return
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROMPT_CHARS:
            bad(field, f"must be a non-empty string of at most {MAX_PROMPT_CHARS} characters or null")

    resolution = hp.resolution
    if resolution != AUTO and (not _is_int(resolution) or not 8 <= resolution <= 4096 or resolution % 8):
        bad("resolution", 'must be a multiple of 8 from 8 to 4096 pixels or "auto"')
    int_in("max_train_steps", 1, 1_000_000)
    number("learning_rate", "a number greater than 0 and at most 1", lambda v: 0 < v <= 1)
    int_in("rank", 1, 256)
    int_in("train_batch_size", 1, 1024)
    int_in("gradient_accumulation_steps", 1, 1024)
    if getattr(hp, "class_prompt", None) is not None:  # else None is fine: prior preservation is off
        number("prior_loss_weight", "a number from 0 to 1000", lambda v: 0 <= v <= 1000)
        int_in("num_class_images", 1, 10_000)
    prompt("class_prompt")
    if "class_prompt" in fields and getattr(hp, "class_prompt") is None:
        for field in ("prior_loss_weight", "num_class_images"):
            if getattr(hp, field) not in (AUTO, None):
                bad(field, "has no effect without class_prompt (prior preservation is on only with a "
                           "class_prompt); set class_prompt or leave this \"auto\"")
    prompt("instance_prompt")
    if not isinstance(hp.train_text_encoder, bool):
        bad("train_text_encoder", "must be true or false")
    number("snr_gamma", "a number greater than 0 (5.0 is the usual choice)", lambda v: v > 0, auto=False, none=True)
    if hp.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        bad("mixed_precision", "must be one of 'auto', 'no', 'fp16', 'bf16'")
    for field in ("gradient_checkpointing", "use_8bit_adam"):
        if getattr(hp, field) != AUTO and not isinstance(getattr(hp, field), bool):
            bad(field, 'must be true, false or "auto"')
    int_in("seed", 0, 2**31 - 1, auto=False)
    prompts = hp.evaluation_prompts
    if prompts is not None and (
            not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_EVALUATION_PROMPTS
            or not all(isinstance(p, str) and p.strip() and len(p) <= MAX_PROMPT_CHARS for p in prompts)):
        bad("evaluation_prompts", f"must be a list of 1 to {MAX_EVALUATION_PROMPTS} non-empty strings of at most "
                                  f"{MAX_PROMPT_CHARS} characters (held-out prompts for CLIP-T), or null for the "
                                  "default set")
    for field in ("checkpoint_every_steps", "validation_every_steps"):
        value = getattr(hp, field)
        if value != AUTO and (not _is_int(value) or not 0 <= value <= 1_000_000):
            bad(field, 'must be a non-negative integer (0 = never) or "auto"')
    return check.problems
