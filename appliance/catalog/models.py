"""Tables of imported base models and of the adapters trained on them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, UTCDateTime, utcnow


class BaseModelRecord(Base):
    """A base model imported into ``$APPLIANCE_HOME/models/<name>`` (plain HF format)."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16), default="llm")  # llm | diffusion | evaluator
    path: Mapped[str] = mapped_column(Text)
    #: ``sha256:<hex>`` over the stored files (lineage).
    content_hash: Mapped[str] = mapped_column(String(80))
    architecture: Mapped[str] = mapped_column(String(128))
    parameters: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    imported_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AdapterRecord(Base):
    """A fine-tuned adapter: encrypted PEFT (or diffusers) files plus a signed manifest."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # ft:<base>:<project>:<suffix>:<job id>
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    base_model: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16), default="lora")
    #: blob object id of the encrypted artefact (a tar of the adapter directory)
    object_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    signature: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
