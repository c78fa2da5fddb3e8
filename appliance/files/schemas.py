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


class FindingGroupOut(msgspec.Struct):
    #: Stable id of the value within this file (an HMAC: names it without showing it).
    id: str
    entity_type: str
    entity_types: dict[str, int]
    count: int
    records: int
    score: float
    actions: dict[str, int]
    #: 1-based lines of its first records.
    first_lines: list[int]
    #: The value, with ``reveal=true`` only.
    value: str | None = None
    #: Up to three places it occurs (``[[value]]``, other findings as ``<TYPE>``), with ``reveal=true`` only.
    contexts: list[str] | None = None
    #: Whether the project's glossary (or policy allow list) already allows it.
    allowed: bool = False
    #: A credential: its value is never shown, even with ``reveal=true``, and no glossary allows it.
    secret: bool = False


class ScanGroups(msgspec.Struct):
    file_id: str
    decision: str
    policy_hash: str
    revision: int
    records: int
    counts: dict[str, Any]
    groups: list[FindingGroupOut]
    object: str = "file.scan.groups"


class QualityReport(msgspec.Struct):
    file_id: str
    revision: int
    #: Counts, lengths, duplicates, problems, languages and advice (see ``appliance.files.quality``); no text.
    quality: dict[str, Any]
    #: With ``reveal=true`` only: the stored (redacted) text of the duplicate examples, per kind.
    examples: dict[str, Any] | None = None
    #: With ``compare=<file id>``: records of that file found (exactly or nearly) in this one.
    leakage: dict[str, Any] | None = None
    object: str = "file.quality"
