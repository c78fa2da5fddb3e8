"""Bodies of the audit API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec


class AuditEventOut(msgspec.Struct):
    seq: int
    ts: datetime
    actor: str
    auth_method: str
    action: str
    resource_type: str | None
    resource_id: str | None
    project: str | None
    outcome: str
    reason: str | None
    origin_ip: str | None
    request_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str
    object: str = "audit.event"


class AuditEventList(msgspec.Struct):
    data: list[AuditEventOut]
    has_more: bool
    first_id: int | None
    last_id: int | None
    object: str = "list"


class ChainStatus(msgspec.Struct):
    ok: bool
    events: int
    head_seq: int
    bad_seq: int | None
    problem: str | None
