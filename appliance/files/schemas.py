"""Bodies of the Files API (OpenAI's shapes, plus the scan summary)."""

from __future__ import annotations

from typing import Any

import msgspec


class FileObject(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    project: str
    scan: dict[str, Any]
    status_details: str | None = None
    expires_at: int | None = None
    object: str = "file"


class FileList(msgspec.Struct):
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: str = "list"


class FileDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "file"


class FindingOut(msgspec.Struct):
    record: int
    field: str
    entity_type: str
    start: int
    end: int
    score: float
    action: str


class ScanReport(msgspec.Struct):
    file_id: str
    decision: str
    policy_hash: str
    records: int
    counts: dict[str, Any]
    findings: list[FindingOut]
    object: str = "file.scan"


class PolicyIn(msgspec.Struct, forbid_unknown_fields=True):
    #: The policy as YAML (or JSON) text.
    text: str


class PolicyOut(msgspec.Struct):
    project: str
    source: str
    content_hash: str
    text: str
    object: str = "policy"
