"""Dry-run scan of a JSONL file: the report behind ``appliance scan FILE``.

:func:`scan_file` streams the file (records are read, scanned and decided in
batches; only findings are kept), so memory depends on how much is found, not
on the file's size. Record numbers in findings are the file's 1-based line
numbers.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import InvalidRequestError
from appliance.policy.decision import Decision, DecisionBuilder
from appliance.policy.model import Policy
from appliance.scanning.engine import Scanner, get_scanner
from appliance.scanning.findings import ScanUnit
from appliance.scanning.jsonl import iter_jsonl
from appliance.scanning.records import iter_text_fields

#: How many line numbers the text report lists per blocked type before "and N more".
MAX_LINES_SHOWN = 20


@dataclass(frozen=True)
class Report:
    """What a scan found in one file and what the policy decided.

    Attributes:
        file: The file's name as given.
        records: Records (non-blank lines) read.
        fields: Text fields scanned.
        characters: Characters scanned.
        decision: The policy's decision; its findings carry ``record`` = line number.
    """

    file: str
    records: int
    fields: int
    characters: int
    decision: Decision

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: file stats, decision, policy hash, counts, blocked lines and findings."""
        doc = self.decision.to_dict()
        doc["blocked_lines"] = {t: [r + 1 for r in records] for t, records in self.decision.blocked.items()}
        return {"file": self.file, "records": self.records, "fields": self.fields, "characters": self.characters, **doc}


class _Counter:
    def __init__(self) -> None:
        self.records = self.fields = self.characters = 0


def _units(stream: BinaryIO, counter: _Counter, recent: OrderedDict, keep: int) -> Iterator[ScanUnit]:
    """The text fields of the stream's records; the last ``keep`` texts also go to ``recent`` (for the allow list)."""
    for line_no, record in iter_jsonl(stream):
        counter.records += 1
        for path, text in iter_text_fields(record):
            counter.fields += 1
            counter.characters += len(text)
            recent[(line_no - 1, path)] = text
            if len(recent) > keep:
                recent.popitem(last=False)
            yield ScanUnit(line_no - 1, path, text)  # `record` is the 0-based line index, as in the API


def scan_stream(
    stream: BinaryIO,
    policy: Policy,
    *,
    name: str = "<stream>",
    scanner: Scanner | None = None,
    entities: Collection[str] | None = None,
) -> Report:
    """Scan a JSONL byte stream and apply ``policy`` (see :func:`scan_file`)."""
    scanner = scanner or get_scanner()
    counter = _Counter()
    builder = DecisionBuilder(policy)
    wanted = policy.scanned_entities() if entities is None else entities
    # The scanner yields a batch's findings before it reads the next batch: two batches of texts suffice.
    recent: OrderedDict = OrderedDict()
    units = _units(stream, counter, recent, keep=2 * scanner.batch_size)
    builder.add(scanner.iter_scan(units, entities=wanted), lambda f: recent[(f.record, f.field)])
    return Report(
        file=name, records=counter.records, fields=counter.fields, characters=counter.characters, decision=builder.result()
    )


def scan_file(
    path: str | Path, policy: Policy, *, scanner: Scanner | None = None, entities: Collection[str] | None = None
) -> Report:
    """Scan a JSONL fine-tune file and apply ``policy``, streaming.

    Args:
        path: The file.
        policy: The policy to apply.
        scanner: Defaults to the process-wide :func:`get_scanner`.
        entities: Types to look for; default every type the policy does not allow.

    Raises:
        InvalidRequestError: The file cannot be read (``param`` ``file``), or a
            line is malformed (``param`` ``line N`` or ``line N: <field>``).
    """
    path = Path(path)
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {str(path)!r}: {exc.strerror}", param="file") from None
    with stream:
        return scan_stream(stream, policy, name=str(path), scanner=scanner, entities=entities)


def render_json(report: Report) -> str:
    """The report as indented JSON (findings in the API shape)."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


def _lines(records: tuple[int, ...]) -> str:
    shown = ", ".join(str(r + 1) for r in records[:MAX_LINES_SHOWN])  # records are 0-based, lines 1-based
    more = len(records) - MAX_LINES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def render_text(report: Report) -> str:
    """The report for a person: decision, counts by type and action, blocked types by line."""
    d = report.decision
    replaces = d.counts_by_action.get("redact") or d.counts_by_action.get("pseudonymize")
    out = [
        f"File:      {report.file} ({report.records} records, {report.fields} text fields, {report.characters} characters)",
        f"Policy:    {d.policy_hash}",
        f"Decision:  {d.outcome.upper()}"
        + (" (blocked types found)" if not d.accepted else " (redactions will be applied)" if replaces else ""),
    ]
    if d.counts_by_type:
        out.append("")
        width = max(len(t) for t in d.counts_by_type)
        actions: dict[str, str] = {}
        for f in d.findings:
            actions.setdefault(f.entity_type, f.action or "")
        out.append(f"  {'ENTITY TYPE':<{width}}  {'COUNT':>5}  ACTION")
        for etype, count in d.counts_by_type.items():
            out.append(f"  {etype:<{width}}  {count:>5}  {actions.get(etype, '')}")
        out.append("")
        out.append("By action: " + ", ".join(f"{a} {n}" for a, n in d.counts_by_action.items()))
    else:
        out.append("Nothing found.")
    if d.blocked:
        out.append("")
        out.append("Blocked, by line:")
        for etype, records in d.blocked.items():
            out.append(f"  {etype}: line{'s' if len(records) > 1 else ''} {_lines(records)}")
    if d.dropped_below_threshold:
        out.append("")
        out.append(f"Ignored {d.dropped_below_threshold} finding(s) scoring under the policy's threshold.")
    return "\n".join(out)
