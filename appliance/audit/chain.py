"""Canonical form and hashing of audit events.

An event's hash is ``SHA-256(prev_hash_hex || canonical_json(event))`` where the
canonical JSON has sorted keys, no insignificant whitespace, UTF-8, and the
timestamp as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``. Every field except ``hash``
itself is covered, ``seq`` and ``prev_hash`` included, so editing, deleting,
inserting or reordering rows breaks the chain.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

HASHED_FIELDS = (
    "seq",
    "ts",
    "actor",
    "auth_method",
    "action",
    "resource_type",
    "resource_id",
    "project",
    "outcome",
    "reason",
    "origin_ip",
    "request_id",
    "details",
    "prev_hash",
)


def format_ts(ts: datetime) -> str:
    """UTC timestamp with microseconds and a ``Z``, the only form hashed."""
    if ts.tzinfo is None:
        raise ValueError(f"naive timestamp {ts!r}; audit timestamps are aware UTC")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def event_document(fields: dict[str, Any]) -> dict[str, Any]:
    """The hashed document of an event given its column values."""
    doc = {name: fields[name] for name in HASHED_FIELDS}
    doc["ts"] = format_ts(doc["ts"])
    doc["details"] = doc["details"] or {}
    return doc


def event_hash(fields: dict[str, Any]) -> str:
    doc = event_document(fields)
    return hashlib.sha256(doc["prev_hash"].encode("ascii") + canonical_json(doc)).hexdigest()
