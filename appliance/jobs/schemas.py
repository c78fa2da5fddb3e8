"""Bodies of the fine-tuning API, in OpenAI's shapes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec


# -- request: POST /v1/fine_tuning/jobs -------------------------------------------
# What the OpenAPI document shows. The service checks the body field by field
# (``JobService.create``), so that every problem is reported at once.

class MethodSettings(msgspec.Struct):
    """The settings of one training method."""

    hyperparameters: Annotated[dict[str, Any], msgspec.Meta(
        description="The method's hyperparameters, each a value or \"auto\" (see the README for each method's "
                    "fields); unknown names are errors.")] = msgspec.field(default_factory=dict)


class JobMethod(msgspec.Struct):
    """``{"type": "lora", "lora": {"hyperparameters": {...}}}``; only the object named by ``type`` may be given."""

    type: Annotated[Literal["lora", "qlora", "supervised", "dreambooth", "dreambooth_lora"], msgspec.Meta(
        description="LoRA or QLoRA for language models ('supervised' means LoRA); LoRA, DreamBooth or "
                    "DreamBooth-LoRA for image models.")] = "lora"
    lora: MethodSettings | None = None
    qlora: MethodSettings | None = None
    supervised: MethodSettings | None = None
    dreambooth: MethodSettings | None = None
    dreambooth_lora: MethodSettings | None = None


class MemorizationOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Memorisation tests of a language-model job: canaries and the extraction probe."""

    canaries: Annotated[int, msgspec.Meta(ge=0, le=16)] = 0
    canary_repetitions: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    extraction_probe: bool = True
    probe_samples: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32


class ComputeOptions(msgspec.Struct, forbid_unknown_fields=True):
    """How the job runs: ``workers`` data-parallel workers (Ray executor), the base model laid out by ``sharding``."""

    workers: Annotated[int, msgspec.Meta(ge=1)] = 1
    sharding: Literal["auto", "none", "fsdp"] = "auto"


_IGNORED = msgspec.Meta(description="Accepted for OpenAI's clients; ignored.")


#: A job's ``suffix`` (part of the model's name); the portal's form checks the same pattern, in the same words.
SUFFIX_PATTERN = "[A-Za-z0-9._-]{1,64}"
SUFFIX_EXPECTED = "1-64 characters of letters, digits, '.', '_' or '-'"


class JobCreate(msgspec.Struct):
    """Create a fine-tuning job (OpenAI's shape, plus ``memorization`` and ``compute``).

    Every problem is reported in one 400: ``param`` names the first field, the message lists each
    as ``field: problem``. Fields not listed here are ignored, as OpenAI's are.
    """

    model: Annotated[str, msgspec.Meta(description="A base model of the catalogue.")]
    training_file: Annotated[str, msgspec.Meta(description="A scanned and accepted file of the project.")]
    validation_file: str | None = None
    class_images_file: Annotated[str, msgspec.Meta(description=(
        "DreamBooth with prior preservation (`class_prompt` set): an image dataset of the class, used instead of "
        "images the base model generates; with fewer images than `num_class_images`, the rest are generated."
    ))] | None = None
    suffix: Annotated[str, msgspec.Meta(pattern=f"^{SUFFIX_PATTERN}$")] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, lt=2**31)] | None = None
    method: JobMethod | None = None
    #: OpenAI's older top-level form: the hyperparameters of supervised (LoRA) fine-tuning.
    hyperparameters: Annotated[dict[str, Any], msgspec.Meta(
        description="OpenAI's older form of `method.lora.hyperparameters` (used when `method` is absent)."
    )] | None = None
    memorization: MemorizationOptions | None = None
    compute: ComputeOptions | None = None
    search: Annotated[dict[str, Any], msgspec.Meta(description=(
        "A hyperparameter search (language models): the budget, `{\"trials\": 4, \"max_seconds\": 3600, "
        "\"sampler\": \"tpe\"|\"random\"|\"grid\", \"early_stopping\": \"median\"|\"none\"}`, with "
        "`method.<type>.hyperparameters` giving `{\"range\": [low, high], \"scale\": \"linear\"|\"log\"}` or "
        "`{\"choice\": [...]}` for the fields to search. Each trial runs as a job of its own; the trial of the "
        "lowest validation loss becomes this job's `fine_tuned_model`."))] | None = None
    integrations: Annotated[list[Any], _IGNORED] | None = None
    metadata: Annotated[dict[str, str], _IGNORED] | None = None


# -- responses ---------------------------------------------------------------------

class JobError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None


class JobObject(msgspec.Struct):
    id: str
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    error: JobError | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    #: extension: the uploaded class images of a DreamBooth job with prior preservation (None: generated)
    class_images_file: str | None
    trained_tokens: int | None
    seed: int
    estimated_finish: int | None
    user_provided_suffix: str | None
    metrics: dict[str, Any]
    resumable: bool
    #: extensions: the memorisation tests asked for and their results (canary exposure, extraction probe, DP)
    memorization: dict[str, Any] = msgspec.field(default_factory=dict)
    privacy: dict[str, Any] = msgspec.field(default_factory=dict)
    #: how the job runs: {"workers": n} for n data-parallel workers (an extension of OpenAI's shape)
    compute: dict[str, Any] = msgspec.field(default_factory=dict)
    #: extension: a search job's space, budget and trials; a trial's search job, number and values
    search: dict[str, Any] | None = None
    integrations: list[Any] = msgspec.field(default_factory=list)
    metadata: dict[str, str] | None = None
    object: str = "fine_tuning.job"


class JobList(msgspec.Struct):
    data: list[JobObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"


class EventObject(msgspec.Struct):
    id: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None
    object: str = "fine_tuning.job.event"


class EventList(msgspec.Struct):
    data: list[EventObject]
    has_more: bool
    object: str = "list"


class CheckpointObject(msgspec.Struct):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    object: str = "fine_tuning.job.checkpoint"


class CheckpointList(msgspec.Struct):
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
    object: str = "list"
