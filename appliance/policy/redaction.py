"""Replacing ``redact`` findings with ``<ENTITY_TYPE>`` placeholders and ``pseudonymize`` ones with surrogates.

Overlapping findings are merged into one span, typed after its longest member;
a merged span is pseudonymized only if every member is (otherwise it gets the
placeholder: the stricter action wins). Without a :class:`Surrogates` (the
output guard has no dataset key), ``pseudonymize`` falls back to the placeholder.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from appliance.policy.surrogates import Surrogates
from appliance.scanning.findings import REPLACING_ACTIONS, Finding
from appliance.scanning.records import iter_text_slots


def _merge(spans: list[Finding]) -> list[tuple[int, int, str, bool]]:
    """Overlapping spans merged into one, typed after its longest member; whether all its members pseudonymize."""
    merged: list[tuple[int, int, str, int, bool]] = []  # start, end, type, length of the type's span, pseudonymize
    for f in sorted(spans, key=lambda f: (f.start, -f.end)):
        pseudo = f.action == "pseudonymize"
        if merged and f.start < merged[-1][1]:
            start, end, etype, length, all_pseudo = merged[-1]
            if f.end - f.start > length:
                etype, length = f.entity_type, f.end - f.start
            merged[-1] = (start, max(end, f.end), etype, length, all_pseudo and pseudo)
        else:
            merged.append((f.start, f.end, f.entity_type, f.end - f.start, pseudo))
    return [(s, e, t, p) for s, e, t, _, p in merged]


def _replacements(text: str, findings: Iterable[Finding], surrogates: Surrogates | None) -> list[tuple[int, int, str]]:
    """``(start, end, replacement)`` per merged span, in order."""
    out = []
    for start, end, etype, pseudo in _merge(list(findings)):
        value = surrogates.value(etype, text[start:end]) if pseudo and surrogates is not None else f"<{etype}>"
        out.append((start, end, value))
    return out


def redact_text(text: str, findings: Iterable[Finding], surrogates: Surrogates | None = None) -> str:
    """``text`` with each finding's span replaced: ``<ENTITY_TYPE>``, or a surrogate for ``pseudonymize`` ones."""
    pieces, pos = [], 0
    for start, end, value in _replacements(text, findings, surrogates):
        pieces += [text[pos:start], value]
        pos = end
    return "".join(pieces) + text[pos:] if pieces else text


def stored_span(finding: Finding, redactions: Iterable[Finding], text: str,
                surrogates: Surrogates | None = None) -> tuple[int, int] | None:
    """Where ``finding``'s value lies once ``redactions`` are applied to ``text``, its field (``None``: one overlaps it).

    Each replacement moves everything after it by the difference in length.
    """
    shift = 0
    for start, end, value in _replacements(text, [r for r in redactions if r.field == finding.field], surrogates):
        if start < finding.end and finding.start < end:
            return None
        if end <= finding.start:
            shift += len(value) - (end - start)
    return finding.start + shift, finding.end + shift


def replaced_span(finding: Finding, redactions: Iterable[Finding], text: str,
                  surrogates: Surrogates | None = None) -> tuple[int, int] | None:
    """Where the replacement of a redacted (or pseudonymized) ``finding`` lies once ``redactions`` (which include
    it) are applied to ``text``: the placeholder or surrogate of the merged span that covers it."""
    shift = 0
    for start, end, value in _replacements(text, [r for r in redactions if r.field == finding.field], surrogates):
        if start <= finding.start and finding.end <= end:
            return start + shift, start + shift + len(value)
        if end <= finding.start:
            shift += len(value) - (end - start)
    return None


def redact_record(record: dict[str, Any], findings: Iterable[Finding],
                  surrogates: Surrogates | None = None) -> dict[str, Any]:
    """A copy of ``record``: ``redact`` findings replaced by ``<ENTITY_TYPE>``, ``pseudonymize`` ones by surrogates.

    The JSON structure is kept; only text fields change. Findings whose action
    is ``allow`` or ``block`` are left alone (a blocked file is not trained on).

    Args:
        record: One fine-tune record (not modified).
        findings: The decided findings of this record (``action`` set by
            :func:`~appliance.policy.decide`).
        surrogates: The dataset's surrogates; without them ``pseudonymize``
            findings get the placeholder too.

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
        if f.action in REPLACING_ACTIONS:
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
        container[key] = redact_text(text, field_findings, surrogates)
    return out
