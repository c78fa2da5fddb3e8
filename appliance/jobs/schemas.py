"""Bodies of the fine-tuning API, in OpenAI's shapes."""

from __future__ import annotations

from typing import Any

import msgspec


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
