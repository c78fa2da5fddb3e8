"""Intake scanning: personal data and secrets in fine-tune records, offline.

Public API:

* :class:`Scanner` / :func:`get_scanner` - scan ``(record, field, text)`` units.
* :class:`Finding`, :class:`ScanUnit` and the entity type sets.
* :func:`iter_text_fields`, :func:`validate_record` - the record shapes.
* :func:`iter_jsonl` - streaming JSONL reader with line-numbered errors.
* :func:`scan_file`, :class:`Report`, :func:`render_text`, :func:`render_json`.
"""

from appliance.scanning.engine import DEFAULT_MODEL, Scanner, get_scanner
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
from appliance.scanning.records import ROLES, iter_text_fields, validate_record

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
    "validate_record",
]
