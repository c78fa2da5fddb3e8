"""Tables of fine-tuning jobs, their events and checkpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, UTCDateTime, utcnow

#: Job statuses after which nothing more happens.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class FineTuningJob(Base):
    """A job in OpenAI's shape, plus what the queue and recovery need."""

    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), default=None)
    #: an image dataset of the class, for DreamBooth's prior preservation (None: the base model generates them)
    class_images_file: Mapped[str | None] = mapped_column(String(64), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(Integer)
    method_type: Mapped[str] = mapped_column(String(32))
    #: hyperparameters as requested ("auto" kept) and as resolved by the recipe
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    resolved: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: how the job runs, e.g. {"workers": 2} data-parallel workers (the Ray executor); {} is one worker
    compute: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(24), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    resumable: Mapped[bool] = mapped_column(default=False)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), default=None)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: the ``memorization`` option (with the canary sentences drawn at creation) and its results
    memorization: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    privacy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: ids of result files (evaluation grids, validation images), stored encrypted like uploads
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: the scheduler instance that claimed the job last (``host:node:pid:random``); it owns a running job
    #: while its lease lasts, renewing ``heartbeat_at`` and ``lease_expires_at`` as it supervises the worker
    worker: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    #: until when ``worker`` owns the running job; after it, any scheduler may fail it (resumable)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    estimated_finish: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    #: a hyperparameter search (issue 24): its spec (space, fixed values, budget) and trial table; such a job
    #: trains nothing itself (the scheduler never claims it), its trials are child jobs (``search_id``)
    search: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    #: a search trial: the search job's id and the trial's number in its study
    search_id: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    trial_number: Mapped[int | None] = mapped_column(Integer, default=None)


class JobEvent(Base):
    """``fine_tuning.job.event``: progress, metrics and status messages."""

    __tablename__ = "fine_tuning_job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class JobCheckpoint(Base):
    """``fine_tuning.job.checkpoint``: a resumable training state, encrypted in the blob store."""

    __tablename__ = "fine_tuning_job_checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    object_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
