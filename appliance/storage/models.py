"""The registry of data keys: one row per stored object, kept as evidence after shredding."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from appliance.db.base import Base, UTCDateTime, utcnow


class DataKey(Base):
    """The wrapped data key of one encrypted object.

    Crypto-shredding sets ``wrapped`` to NULL and stamps ``shredded_at``; the
    row stays so that reports can show when and how the object was destroyed.
    """

    __tablename__ = "data_keys"

    object_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    kek_id: Mapped[str] = mapped_column(String(32), index=True)
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    ciphertext_bytes: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rewrapped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    shredded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
