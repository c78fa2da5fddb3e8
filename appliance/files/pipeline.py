"""The intake pipeline: validate, scan, apply the policy, redact and encrypt, in one pass.

Fed chunk by chunk as the upload streams in (each call in a worker thread),
a batch of records at a time, so memory stays bounded whatever the file size.
Records are written to the encrypted blob as they are cleared; if the policy
blocks anything, the caller discards the blob (nothing is kept) and the
report says which types were found on which lines.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from appliance.policy import Policy, decide, redact_record
from appliance.policy.redaction import replaced_span, stored_span
from appliance.policy.surrogates import Surrogates
from appliance.errors import InvalidLinesError, InvalidRequestError
from appliance.files.quality import QualityPass
from appliance.scanning import Finding, Scanner, iter_text_fields, parse_line
from appliance.scanning.findings import REPLACING_ACTIONS
from appliance.storage.blobs import BlobWriter

BATCH_RECORDS = 256
#: Runs the quality pass of a batch while the next batch is scanned: its tokenizer (Rust) and numpy release
#: the GIL, so on two cores most of it overlaps the scan. Each intake keeps one batch in flight at most.
_QUALITY_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="quality")


@dataclass
class IntakeReport:
    """What one pass over an upload found and did."""

    records: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0
    redacted_records: int = 0
    content_sha256: str = ""
    findings: list[Finding] = field(default_factory=list)
    findings_truncated: bool = False
    by_type: Counter[str] = field(default_factory=Counter)
    by_action: Counter[str] = field(default_factory=Counter)
    #: entity type -> 1-based line numbers where it was blocked (first 20 per type)
    blocked_lines: dict[str, list[int]] = field(default_factory=dict)
    #: index in ``findings`` -> (record index in the stored file, start, end in the stored text): for
    #: ``allow`` findings where the value is stored intact, for redacted and pseudonymized ones where their
    #: placeholder or surrogate is (blank lines and redaction shift both)
    stored_spans: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    #: the quality report of the stored records (:mod:`appliance.files.quality`), when one was asked for
    quality: dict[str, Any] | None = None

    @property
    def blocked(self) -> bool:
        return bool(self.blocked_lines)

    def summary(self, policy: Policy) -> dict[str, Any]:
        return {
            "decision": "rejected" if self.blocked else "accepted",
            "policy_hash": policy.content_hash,
            "records": self.records,
            "findings": sum(self.by_type.values()),
            "by_entity_type": dict(sorted(self.by_type.items())),
            "by_action": dict(sorted(self.by_action.items())),
            "redacted_records": self.redacted_records,
            "findings_truncated": self.findings_truncated,
        } | ({"quality": self.quality} if self.quality is not None else {})


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")).encode() + b"\n"


class JsonlIntake:
    """Push-based pipeline: :meth:`feed` raw upload bytes as they arrive, then :meth:`close`.

    Lines are split, parsed and validated as they complete; every
    ``BATCH_RECORDS`` records are scanned together (spaCy's ``pipe``), decided
    by the policy, redacted and written to the encrypted blob.

    Args:
        writer: Receives the cleared (possibly redacted) JSONL.
        scanner: The intake scanner.
        policy: The project's policy.
        max_line_bytes: Longest accepted line; bounds memory per record.
        max_findings: Findings kept for the report; counts stay exact beyond it.
        require_answers: Refuse records with nothing to train on (a chat without an assistant
            answer, an empty completion).
        quality: Fed the stored records batch by batch; its summary becomes ``report.quality``.

    ``pseudonymize`` findings get surrogates keyed by a secret derived from the
    blob's data key (:meth:`BlobWriter.derive_secret`).
    """

    def __init__(
        self,
        writer: BlobWriter,
        scanner: Scanner,
        policy: Policy,
        *,
        max_line_bytes: int = 8 * 1024 * 1024,
        max_findings: int = 100_000,
        require_answers: bool = True,
        quality: QualityPass | None = None,
    ) -> None:
        self.writer, self.scanner, self.policy = writer, scanner, policy
        self.quality = quality
        self._quality_job: Future[None] | None = None
        self.require_answers = require_answers
        self.surrogates = Surrogates(writer.derive_secret("surrogates"))
        self.max_line_bytes, self.max_findings = max_line_bytes, max_findings
        self.report = IntakeReport()
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self._line_no = 0
        self._batch: list[tuple[int, dict[str, Any]]] = []
        #: the bad lines, ``(param, message)``, reported together at :meth:`close` (the first 100)
        self.problems: list[tuple[str, str]] = []
        self.bad_lines = 0

    def feed(self, data: bytes) -> None:
        self.report.original_bytes += len(data)
        self._pending += data
        start = 0
        while True:
            end = self._pending.find(b"\n", start)
            if end < 0:
                break
            self._line(bytes(self._pending[start:end]))
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > self.max_line_bytes:
            raise InvalidRequestError(
                f"line {self._line_no + 1} is longer than {self.max_line_bytes} bytes", param=f"line {self._line_no + 1}"
            )

    def close(self) -> IntakeReport:
        """Finish the pass; the report.

        Raises:
            InvalidLinesError: Some lines are not valid records: every one of them, found in this pass.
            InvalidRequestError: The file holds no records.
        """
        if self._pending:
            self._line(bytes(self._pending))
            self._pending.clear()
        if self.bad_lines:
            raise InvalidLinesError(self.problems, self.bad_lines)
        if self._batch:
            self._flush()
        if self.report.records == 0:
            raise InvalidRequestError("the file holds no records (it is empty or only blank lines)", param="file")
        self.report.content_sha256 = self._digest.hexdigest()
        self._wait_for_quality()
        if self.quality is not None and not self.report.blocked:
            self.report.quality = self.quality.summary()
        return self.report

    def _line(self, raw: bytes) -> None:
        self._line_no += 1
        try:
            record = parse_line(raw, self._line_no, answer=self.require_answers)
        except InvalidRequestError as exc:
            # Every bad line is reported at the end of the pass, not only the first; once one is found
            # nothing more is scanned or stored (the upload is refused), only checked.
            self.bad_lines += 1
            if len(self.problems) < InvalidLinesError.MAX_REPORTED_LINES:
                self.problems.append((exc.param or f"line {self._line_no}", exc.message))
            self._batch.clear()
            return
        if record is None or self.bad_lines:
            return  # blank lines carry nothing; JSONL tools commonly allow them
        self._batch.append((self._line_no - 1, record))  # `record` is the 0-based line index
        self.report.records += 1
        if len(self._batch) >= BATCH_RECORDS:
            self._flush()

    def _flush(self) -> None:
        report, batch = self.report, self._batch
        self._batch = []
        units = [(index, path, text) for index, record in batch for path, text in iter_text_fields(record)]
        found = self.scanner.scan(units, entities=self.policy.inventoried_entities())
        texts = {(index, path): text for index, path, text in units}
        decision = decide(found, self.policy, lambda f: texts[(f.record, f.field)])
        by_record: dict[int, list[Finding]] = {}
        located: dict[int, list[tuple[int, Finding]]] = {}  # record -> (index in report.findings, finding)
        first_stored = report.records - len(batch)  # blank lines are not stored: count records, not lines
        stored_index = {line: first_stored + i for i, (line, _) in enumerate(batch)}
        for f in decision.findings:
            report.by_type[f.entity_type] += 1
            report.by_action[f.action] += 1
            if f.action == "block":
                lines = report.blocked_lines.setdefault(f.entity_type, [])
                if len(lines) < 20 and (not lines or lines[-1] != f.record + 1):
                    lines.append(f.record + 1)
            by_record.setdefault(f.record, []).append(f)
            if len(report.findings) < self.max_findings:
                report.findings.append(f)
                if f.action == "allow" or f.action in REPLACING_ACTIONS:
                    located.setdefault(f.record, []).append((len(report.findings) - 1, f))
            else:
                report.findings_truncated = True
        if report.blocked:
            return  # keep scanning for the report; nothing more is stored
        stored: list[tuple[int, dict[str, Any]]] = []
        for index, record in batch:
            redactions = [f for f in by_record.get(index, []) if f.action in REPLACING_ACTIONS]
            for position, f in located.get(index, []):
                where = replaced_span if f.action in REPLACING_ACTIONS else stored_span
                span = where(f, redactions, texts[(index, f.field)], self.surrogates)
                if span is not None:
                    report.stored_spans[position] = (stored_index[index], *span)
            if redactions:
                record = redact_record(record, redactions, self.surrogates)
                report.redacted_records += 1
            line = _encode(record)
            self._digest.update(line)
            self.writer.write(line)
            report.stored_bytes += len(line)
            stored.append((index, record))
        if self.quality is not None:  # what is stored (redacted), which is what a job trains on
            self._wait_for_quality()  # in order, one batch at a time: memory stays bounded
            self._quality_job = _QUALITY_THREADS.submit(self.quality.add, stored)

    def _wait_for_quality(self) -> None:
        """Wait for the batch in the quality pass, if any (its error, if it failed, is raised here)."""
        job, self._quality_job = self._quality_job, None
        if job is not None:
            job.result()
