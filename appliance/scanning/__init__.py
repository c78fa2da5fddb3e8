"""Intake scanning: personal data and secrets in fine-tune records, offline.

Public API:

* :class:`Scanner` / :func:`get_scanner` - scan ``(record, field, text)`` units.
* :class:`Finding`, :class:`ScanUnit` and the entity type sets.
* :func:`iter_text_fields`, :func:`iter_text_slots`, :func:`validate_record` - the record shapes.
* :func:`iter_jsonl` - streaming JSONL reader with line-numbered errors.

The scanner is imported lazily, so that importing the light parts (finding
types, record shapes, the JSONL reader) does not load presidio.

Scanning knows nothing of policies (it is the layer below
:mod:`appliance.policy`): the dry-run report that applies a policy to a
file's findings, ``appliance scan FILE``, lives in :mod:`appliance.policy.report`
and :mod:`appliance.policy.cli`.
"""

from typing import Any

from appliance.scanning.findings import (
    ACTIONS,
    DEFAULT_ENTITIES,
    NER_ENTITIES,
    PATTERN_PII_ENTITIES,
    SECRET_ENTITIES,
    SUPPORTED_ENTITIES,
    Action,
    Finding,
    ScanUnit,
)
from appliance.scanning.jsonl import MAX_LINE_BYTES, iter_jsonl, parse_line
from appliance.scanning.records import ROLES, iter_text_fields, iter_text_slots, validate_record

_LAZY = {
    "DEFAULT_MODEL": "appliance.scanning.engine",
    "Scanner": "appliance.scanning.engine",
    "get_scanner": "appliance.scanning.engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'appliance.scanning' has no attribute {name!r}")


__all__ = [
    "ACTIONS",
    "DEFAULT_ENTITIES",
    "DEFAULT_MODEL",
    "MAX_LINE_BYTES",
    "NER_ENTITIES",
    "PATTERN_PII_ENTITIES",
    "ROLES",
    "SECRET_ENTITIES",
    "SUPPORTED_ENTITIES",
    "Action",
    "Finding",
    "ScanUnit",
    "Scanner",
    "get_scanner",
    "iter_jsonl",
    "parse_line",
    "iter_text_fields",
    "iter_text_slots",
    "validate_record",
]
