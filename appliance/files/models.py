"""Tables of uploaded files and their scan findings."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, UTCDateTime, utcnow


class StoredFile(Base):
    """An accepted upload. Its content lives encrypted in the blob store under ``id``."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    #: Size of the stored (possibly redacted) content.
    bytes: Mapped[int] = mapped_column(Integer)
    #: Size of the upload as received.
    original_bytes: Mapped[int] = mapped_column(Integer)
    records: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    #: sha256 of the stored content, for lineage in manifests.
    content_sha256: Mapped[str] = mapped_column(String(64))
    #: ``sha256:<hex>`` content hash of the policy that decided.
    policy_hash: Mapped[str] = mapped_column(String(80))
    decision: Mapped[str] = mapped_column(String(16))
    #: counts by entity type and by action, redacted count, findings truncation.
    scan_summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The encrypted object holding the stored content; ``None`` means ``id`` (a re-scan writes a new one).
    blob_id: Mapped[str | None] = mapped_column(String(64), default=None)
    #: The encrypted upload as received, kept for review and re-scanning; ``None`` when not kept.
    original_id: Mapped[str | None] = mapped_column(String(64), default=None)
    #: 1 at upload, +1 per re-scan.
    revision: Mapped[int] = mapped_column(Integer, default=1)

    @property
    def content_object(self) -> str:
        """The blob-store object of the stored (cleared) content."""
        return self.blob_id or self.id


class ScanFinding(Base):
    """One detected entity: where it was and what was done. Never the value itself."""

    __tablename__ = "scan_findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), index=True)
    record: Mapped[int] = mapped_column(Integer)
    field: Mapped[str] = mapped_column(String(255))
    entity_type: Mapped[str] = mapped_column(String(64))
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(16))
    #: the record index and span in the stored (decrypted) file, which blank lines and redactions shift:
    #: of the value for ``allow`` findings kept intact (the extraction probe reads them), of the placeholder or
    #: surrogate for redacted and pseudonymized ones (the portal's masked context)
    stored_record: Mapped[int | None] = mapped_column(Integer, default=None)
    stored_start: Mapped[int | None] = mapped_column(Integer, default=None)
    stored_end: Mapped[int | None] = mapped_column(Integer, default=None)
