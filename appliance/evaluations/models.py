"""The table of evaluations: models run on a test file, their figures side by side."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, UTCDateTime, utcnow

#: Statuses after which nothing more happens.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class Evaluation(Base):
    """One evaluation: 1-4 models (base or fine-tuned) on one test file (purpose ``evals``).

    ``kind`` is the base model's: ``llm`` (loss, answers) or ``diffusion`` (images for the test file's prompts).
    """

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str] = mapped_column(String(64))
    file: Mapped[str] = mapped_column(String(64))
    #: the models compared, as named in the request (base model names, ``ft:...`` adapter ids)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: the base model every one of ``models`` runs on
    base_model: Mapped[str] = mapped_column(String(128))
    #: the base model's kind: ``llm`` or ``diffusion``
    kind: Mapped[str] = mapped_column(String(16), default="llm", server_default="llm")
    samples: Mapped[int] = mapped_column(Integer)
    #: text models: most tokens per answer; None for image models
    max_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    #: image models: {"images_per_prompt", "num_inference_steps", "seed"}; None for text models
    images: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    status: Mapped[str] = mapped_column(String(24), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    #: figures per model, in the order of ``models``: [{"model", "loss", "perplexity", ...}] (no text)
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    #: while running, how far the worker is: {"model", "models", "phase", "done", "total", "seconds_left"} (counts)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: image models, once run: {"evaluators": {"clip": name} | None, "metric": how CLIP-T was measured, or why not}
    fidelity: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    #: the encrypted result file holding the generations side by side (text: read as a file's content)
    result_file: Mapped[str | None] = mapped_column(String(64), default=None)
    #: when the result file was crypto-shredded with what it copies (its test file, a fine-tune it ran) and why;
    #: ``result_file`` still names it (deleted)
    result_erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    result_erased_reason: Mapped[str | None] = mapped_column(String(300), default=None)
    #: the runner that claimed it (``host:pid:random``) and until when it owns it
    worker: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
