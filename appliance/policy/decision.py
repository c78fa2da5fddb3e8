"""Applying a policy to findings: per-finding actions and the file's outcome.

A finding whose text lies within a value of the policy's allow list is
``allow`` whatever its type's rule (secrets excepted); that needs the texts,
given as ``text_of``.

A file is ``rejected`` when any finding's action is ``block``; otherwise it is
``accepted`` (its ``redact`` findings are replaced before training). Findings
scoring under their type's threshold are *dropped*: they get no action, are
not counted by type or action and do not appear in :attr:`Decision.findings`;
only their number is kept (:attr:`Decision.dropped_below_threshold`) so a
report can say that low-confidence matches were ignored.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

from appliance.policy.model import Policy
from appliance.scanning.findings import ACTIONS, SECRET_ENTITIES, Finding

#: The text a finding was found in (its record's field).
TextOf = Callable[[Finding], str]

Outcome = Literal["accepted", "rejected"]


@dataclass(frozen=True)
class Decision:
    """The policy's verdict on a set of findings.

    Attributes:
        outcome: ``rejected`` if anything is blocked, else ``accepted``.
        policy_hash: :attr:`Policy.content_hash` of the policy applied.
        findings: Findings at or above their threshold, each with ``action`` set,
            ordered by record, field and offset (empty if built with
            ``keep_findings=False``).
        counts_by_type: Number of kept findings per entity type.
        counts_by_action: Number of kept findings per action (all three present).
        blocked: For each blocked entity type, the records (sorted) where it occurs.
        dropped_below_threshold: Findings ignored for scoring under their threshold.
    """

    outcome: Outcome
    policy_hash: str
    findings: tuple[Finding, ...]
    counts_by_type: Mapping[str, int]
    counts_by_action: Mapping[str, int]
    blocked: Mapping[str, tuple[int, ...]]
    dropped_below_threshold: int = 0

    @property
    def accepted(self) -> bool:
        return self.outcome == "accepted"

    def to_dict(self, *, include_findings: bool = True) -> dict[str, Any]:
        """JSON-ready form; findings in the API shape."""
        doc: dict[str, Any] = {
            "decision": self.outcome,
            "policy_hash": self.policy_hash,
            "counts": {"by_type": dict(self.counts_by_type), "by_action": dict(self.counts_by_action)},
            "blocked": {etype: list(records) for etype, records in self.blocked.items()},
            "dropped_below_threshold": self.dropped_below_threshold,
        }
        if include_findings:
            doc["findings"] = [f.to_dict() for f in self.findings]
        return doc


class DecisionBuilder:
    """Applies a policy to findings arriving in chunks, keeping memory small.

    Args:
        policy: The policy to apply.
        keep_findings: Keep every finding for :attr:`Decision.findings`; with
            ``False`` only counts and blocked records are kept (a streaming
            upload can store findings as they come from :meth:`add`).
    """

    def __init__(self, policy: Policy, *, keep_findings: bool = True) -> None:
        self.policy = policy
        self.keep_findings = keep_findings
        self._findings: list[Finding] = []
        self._by_type: Counter[str] = Counter()
        self._by_action: Counter[str] = Counter({a: 0 for a in ACTIONS})
        self._blocked: dict[str, set[int]] = defaultdict(set)
        self._dropped = 0
        self._spans_of: tuple[str, list[tuple[int, int]]] | None = None

    def add(self, findings: Iterable[Finding], text_of: TextOf | None = None) -> list[Finding]:
        """Decide each finding; return those kept, with ``action`` set.

        Args:
            findings: Findings straight from the scanner.
            text_of: The text of a finding's field, for the allow list; without
                it the allow list is not applied.
        """
        kept = []
        allowed = self._allowed if self.policy.allow_list and text_of is not None else None
        for finding in findings:
            rule = self.policy.rule_for(finding.entity_type)
            if finding.score < rule.threshold:
                self._dropped += 1
                continue
            action = "allow" if allowed is not None and allowed(finding, text_of) else rule.action
            decided = replace(finding, action=action)
            kept.append(decided)
            self._by_type[finding.entity_type] += 1
            self._by_action[action] += 1
            if action == "block":
                self._blocked[finding.entity_type].add(finding.record)
        if self.keep_findings:
            self._findings.extend(kept)
        return kept

    def _allowed(self, finding: Finding, text_of: TextOf) -> bool:
        """Whether the finding lies within an occurrence of an allow-listed value (never for secrets)."""
        if finding.entity_type in SECRET_ENTITIES:
            return False
        text = text_of(finding)
        if self._spans_of is None or self._spans_of[0] is not text:  # findings come grouped by field
            self._spans_of = (text, self.policy.allowed_spans(text))
        return any(s <= finding.start and finding.end <= e for s, e in self._spans_of[1])

    def result(self) -> Decision:
        """The decision over everything added so far."""
        return Decision(
            outcome="rejected" if self._blocked else "accepted",
            policy_hash=self.policy.content_hash,
            findings=tuple(sorted(self._findings, key=lambda f: (f.record, f.field, f.start, f.end, f.entity_type))),
            counts_by_type=MappingProxyType(dict(sorted(self._by_type.items()))),
            counts_by_action=MappingProxyType(dict(self._by_action)),
            blocked=MappingProxyType({t: tuple(sorted(r)) for t, r in sorted(self._blocked.items())}),
            dropped_below_threshold=self._dropped,
        )


def decide(findings: Iterable[Finding], policy: Policy, text_of: TextOf | None = None) -> Decision:
    """Apply ``policy`` to ``findings`` in one go (see :class:`DecisionBuilder` for chunks and ``text_of``)."""
    builder = DecisionBuilder(policy)
    builder.add(findings, text_of)
    return builder.result()
