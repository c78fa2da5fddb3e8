"""Replacing ``redact`` findings with ``<ENTITY_TYPE>`` placeholders, via presidio-anonymizer."""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from appliance.scanning.findings import Finding
from appliance.scanning.records import iter_text_slots


@functools.cache
def _engine() -> Any:
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


def _merge(spans: list[Finding]) -> list[tuple[int, int, str]]:
    """Overlapping spans merged into one, typed after its longest member."""
    merged: list[tuple[int, int, str, int]] = []  # start, end, type, length of the type's span
    for f in sorted(spans, key=lambda f: (f.start, -f.end)):
        if merged and f.start < merged[-1][1]:
            start, end, etype, length = merged[-1]
            if f.end - f.start > length:
                etype, length = f.entity_type, f.end - f.start
            merged[-1] = (start, max(end, f.end), etype, length)
        else:
            merged.append((f.start, f.end, f.entity_type, f.end - f.start))
    return [(s, e, t) for s, e, t, _ in merged]


def redact_text(text: str, findings: Iterable[Finding]) -> str:
    """``text`` with each finding's span replaced by ``<ENTITY_TYPE>`` (overlaps merged)."""
    from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

    spans = _merge(list(findings))
    if not spans:
        return text
    results = [RecognizerResult(entity_type=t, start=s, end=e, score=1.0) for s, e, t in spans]
    return _engine().anonymize(text=text, analyzer_results=results, operators={"DEFAULT": OperatorConfig("replace")}).text


def stored_span(finding: Finding, redactions: Iterable[Finding]) -> tuple[int, int] | None:
    """Where ``finding``'s value lies once ``redactions`` are applied to its field, or ``None`` if one overlaps it.

    :func:`redact_text` replaces each merged span with ``<TYPE>``, which moves
    everything after it by the difference in length.
    """
    shift = 0
    for start, end, etype in _merge([r for r in redactions if r.field == finding.field]):
        if start < finding.end and finding.start < end:
            return None
        if end <= finding.start:
            shift += len(etype) + 2 - (end - start)
    return finding.start + shift, finding.end + shift


def redact_record(record: dict[str, Any], findings: Iterable[Finding]) -> dict[str, Any]:
    """A copy of ``record`` with every ``redact`` finding replaced by ``<ENTITY_TYPE>``.

    The JSON structure is kept; only text fields change. Findings whose action
    is ``allow`` or ``block`` are left alone (a blocked file is not trained on).

    Args:
        record: One fine-tune record (not modified).
        findings: The decided findings of this record (``action`` set by
            :func:`~appliance.policy.decide`).

    Raises:
        ValueError: A finding has no action, belongs to another record, names a
            field the record does not have, or lies outside its field's text.
    """
    by_field: dict[str, list[Finding]] = defaultdict(list)
    records = set()
    for f in findings:
        if f.action is None:
            raise ValueError(
                f"finding {f.entity_type} at {f.field}[{f.start}:{f.end}] has no action; apply a policy with decide() first"
            )
        records.add(f.record)
        if f.action == "redact":
            by_field[f.field].append(f)
    if len(records) > 1:
        raise ValueError(f"`findings` must all belong to one record; got records {sorted(records)}")
    out = copy.deepcopy(record)
    if not by_field:
        return out
    slots = {path: (container, key) for path, container, key in iter_text_slots(out)}
    for path, field_findings in by_field.items():
        if path not in slots:
            raise ValueError(f"finding names field `{path}`, which the record does not have")
        container, key = slots[path]
        text = container[key]
        for f in field_findings:
            if not 0 <= f.start < f.end <= len(text):
                raise ValueError(
                    f"finding span [{f.start}:{f.end}] is outside `{path}` ({len(text)} characters)"
                )
        container[key] = redact_text(text, field_findings)
    return out
