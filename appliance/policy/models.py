"""Tables of per-project policies and their reviewed glossaries."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, UTCDateTime, utcnow


class ProjectPolicy(Base):
    """A project's data policy (YAML as written by its admin); absent means the shipped default."""

    __tablename__ = "project_policies"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(80))
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ProjectGlossary(Base):
    """A project's reviewed glossary: values its data owners marked as not personal data.

    The values themselves are customer data: they live encrypted in the blob
    store (object ``object_id``, one JSON document per revision); this row only
    points at the current revision.
    """

    __tablename__ = "project_glossaries"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    object_id: Mapped[str] = mapped_column(String(64))
    entries: Mapped[int] = mapped_column(Integer)
    #: ``sha256:<hex>`` of the normalised values, sorted.
    content_hash: Mapped[str] = mapped_column(String(80))
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
