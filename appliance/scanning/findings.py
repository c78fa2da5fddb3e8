"""What the scanner looks for and what it reports.

A :class:`Finding` says *where* something sensitive is (record, field path,
character offsets) and *what* it is, never the matched value itself: findings
are stored, logged and returned by the API, and raw values must not reach any
of those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

Action = Literal["block", "redact", "pseudonymize", "allow"]
ACTIONS: tuple[Action, ...] = ("block", "redact", "pseudonymize", "allow")
#: Actions that change the text before training: a placeholder, or a surrogate.
REPLACING_ACTIONS: frozenset[str] = frozenset({"redact", "pseudonymize"})

#: Credentials. Leaking one into a model is a security incident, not a privacy one.
SECRET_ENTITIES: frozenset[str] = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "GCP_API_KEY",
        "AZURE_STORAGE_KEY",
        "GITHUB_TOKEN",
        "GITLAB_TOKEN",
        "SLACK_TOKEN",
        "PRIVATE_KEY",
        "JWT",
        "APPLIANCE_TOKEN",
        "GENERIC_SECRET",
    }
)

#: Personal data found by patterns and checksums.
PATTERN_PII_ENTITIES: frozenset[str] = frozenset(
    {"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS", "UK_NHS"}
)

#: Personal data found (at least partly) by the spaCy NER model.
NER_ENTITIES: frozenset[str] = frozenset({"PERSON", "LOCATION"})

#: Every type the scanner can report.
SUPPORTED_ENTITIES: frozenset[str] = SECRET_ENTITIES | PATTERN_PII_ENTITIES | NER_ENTITIES

#: Looked for unless the caller asks otherwise. LOCATION (any city or country
#: name) is opt-in: on its own it is rarely personal and it floods business text.
DEFAULT_ENTITIES: frozenset[str] = SUPPORTED_ENTITIES - {"LOCATION"}


class ScanUnit(NamedTuple):
    """One text to scan: which record, which field in it, and the text."""

    record: int
    field: str
    text: str


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected entity, without its value.

    Attributes:
        record: The record's index as given in the :class:`ScanUnit` (the
            1-based line number when scanning a JSONL file).
        field: Path of the text field in the record, e.g. ``messages[1].content``.
        entity_type: One of :data:`SUPPORTED_ENTITIES`.
        start: Offset of the first character in the field's text (Python
            ``str`` index, i.e. Unicode code points).
        end: Offset one past the last character.
        score: Confidence in [0, 1].
        action: ``block``, ``redact`` or ``allow`` once a policy has decided;
            ``None`` straight from the scanner.
    """

    record: int
    field: str
    entity_type: str
    start: int
    end: int
    score: float
    action: Action | None = None

    def to_dict(self) -> dict[str, Any]:
        """The API shape: ``{record, field, entity_type, start, end, score, action}``."""
        doc = asdict(self)
        doc["score"] = round(self.score, 4)
        return doc
