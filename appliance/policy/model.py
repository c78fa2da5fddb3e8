"""Data policies: what to do with each entity type the scanner finds.

A policy file (YAML or JSON) looks like::

    version: 1
    description: Strictest reasonable default.   # optional, not hashed
    default:                                     # for types not listed
      action: block
      threshold: 0.5
    entities:
      PERSON: {action: redact, threshold: 0.6}
      EMAIL_ADDRESS: redact                      # shorthand for {action: redact}
      LOCATION: allow
    retention:                                   # optional; a missing key keeps forever
      datasets: 90d                              # uploads, counted from the upload
      adapters: 365d                             # adapters, counted from their publication
    allow_list:                                  # optional: this project's words that are no personal data
      - Velvet Anchor
      - Project Carter

Actions: ``block`` rejects the whole file, ``redact`` replaces the text with
``<ENTITY_TYPE>`` before training, ``pseudonymize`` replaces it with a
consistent surrogate (:mod:`appliance.policy.surrogates`; for PERSON,
EMAIL_ADDRESS, PHONE_NUMBER, IP_ADDRESS and LOCATION only), ``allow`` keeps it.
A finding scoring under its type's threshold (or the default threshold) is
dropped, as if it had not been found.

The allow list (presidio's term) holds values the project has reviewed as not
personal data: codenames, products, customer companies. A finding whose text
lies within an occurrence of an allowed value (case and spacing aside) is
``allow`` whatever its type's rule, at intake and in the output guard; secrets
are the exception, as no review makes a credential harmless.

Retention periods are ``<n>d`` (days) or ``<n>h`` (hours), from 1 hour to
36500 days; :mod:`appliance.retention` crypto-shreds what outlived them.

:func:`parse_policy` validates the whole document and raises one
:class:`PolicyError` listing every problem, each naming its key path and the
value received. The policy's :attr:`Policy.content_hash` is the SHA-256 of a
canonical JSON form of what it decides (version, default and entity rules,
retention periods when set, sorted keys), so reformatting, reordering keys or
editing the description do not change it, while any change of meaning does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from appliance.errors import InvalidRequestError
from appliance.policy.surrogates import SURROGATE_TYPES
from appliance.scanning.findings import ACTIONS, SUPPORTED_ENTITIES, Action

POLICY_VERSION = 1
_TOP_KEYS = ("version", "description", "default", "entities", "retention", "allow_list", "quality")
#: Limits of the allow list: entries, and characters per entry.
MAX_ALLOW_LIST = 10_000
MAX_ALLOWED_VALUE_CHARS = 200
_RULE_KEYS = ("action", "threshold")
#: What a retention period may apply to.
RETENTION_KEYS = ("datasets", "adapters")
#: Problems of the dataset quality report (``appliance.files.quality``) a policy may block uploads on.
QUALITY_CODES = ("exact_duplicates", "near_duplicates", "over_max_seq_length", "empty_conversation",
                 "no_user_message", "no_assistant_answer", "empty_message", "system_not_first",
                 "starts_without_user", "repeated_role", "ends_without_answer")
_DURATION_RE = re.compile(r"^([1-9][0-9]*)([dh])$")
_MAX_RETENTION_HOURS = 36500 * 24


class PolicyError(InvalidRequestError):
    """A policy document is invalid; :attr:`problems` lists every problem found."""

    code = "invalid_policy"

    def __init__(self, problems: list[str], *, source: str = "policy") -> None:
        self.problems = problems
        super().__init__(f"invalid {source}:\n  " + "\n  ".join(problems), param="policy")


@dataclass(frozen=True)
class EntityRule:
    """What to do with one entity type, and from which score on."""

    action: Action
    threshold: float


@dataclass(frozen=True)
class Retention:
    """How long a project keeps its data; ``None`` keeps it forever.

    Attributes:
        datasets: Age, counted from the upload, at which an uploaded file is crypto-shredded.
        adapters: Age, counted from the publication, at which an adapter is crypto-shredded.
    """

    datasets: timedelta | None = None
    adapters: timedelta | None = None

    def period(self, kind: str) -> timedelta | None:
        """The period of ``datasets`` or ``adapters``."""
        return getattr(self, kind)

    def canonical(self) -> dict[str, str]:
        """The periods that are set, each in its shortest exact form (``24h`` is ``1d``)."""
        return {k: format_duration(v) for k in RETENTION_KEYS if (v := self.period(k)) is not None}


def format_duration(period: timedelta) -> str:
    """``90d`` or ``36h``: whole days when exact, else hours."""
    hours = int(period.total_seconds()) // 3600
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :func:`parse_policy` or :func:`load_policy`.

    Attributes:
        default: Rule for entity types not listed in ``entities``.
        entities: Rules per entity type.
        description: Free text; not part of the content hash.
        retention: How long datasets and adapters are kept (default: forever).
        content_hash: ``sha256:<hex>`` of the canonical form.
    """

    default: EntityRule
    entities: Mapping[str, EntityRule] = field(default_factory=dict)
    description: str = ""
    retention: Retention = field(default_factory=Retention)
    allow_list: tuple[str, ...] = ()
    #: Quality problem -> the largest share of a file's records it may affect; above it the upload is refused.
    #: Empty (the default): the quality report never blocks.
    quality_block: Mapping[str, float] = field(default_factory=dict)
    version: int = POLICY_VERSION
    content_hash: str = ""

    def allowed_spans(self, text: str) -> list[tuple[int, int]]:
        """Where allowed values occur in ``text`` (whole words, case and runs of spaces aside)."""
        if not self.allow_list:
            return []
        return [(m.start(), m.end()) for m in _allow_pattern(self.allow_list).finditer(text)]

    def with_allowed(self, values: Iterable[str]) -> Policy:
        """This policy with ``values`` added to its allow list (a project's reviewed glossary).

        The content hash covers the merged list, so a file's ``policy_hash``
        tells which glossary applied to it as well.
        """
        seen = {normalize_allowed(v) for v in self.allow_list}
        extra = []
        for value in values:
            key = normalize_allowed(value)
            if key and key not in seen:
                seen.add(key)
                extra.append(value)
        if not extra:
            return self
        merged = dataclasses.replace(self, allow_list=(*self.allow_list, *extra))
        return dataclasses.replace(merged, content_hash=_hash(merged.canonical()))

    def rule_for(self, entity_type: str) -> EntityRule:
        """The rule applying to ``entity_type`` (its own, else the default)."""
        return self.entities.get(entity_type, self.default)

    def scanned_entities(self) -> frozenset[str]:
        """Supported entity types whose action is not ``allow``: the ones worth scanning for."""
        return frozenset(t for t in SUPPORTED_ENTITIES if self.rule_for(t).action != "allow")

    def inventoried_entities(self) -> frozenset[str]:
        """:meth:`scanned_entities` plus the types the policy names explicitly as ``allow``.

        Training data is scanned for these: an explicitly allowed value is kept,
        but its finding is recorded so the owner sees it and the extraction
        probe (:mod:`appliance.training.memorization`) can test it after training.
        """
        named = {t for t, rule in self.entities.items() if rule.action == "allow" and t in SUPPORTED_ENTITIES}
        return self.scanned_entities() | named

    def canonical(self) -> dict[str, Any]:
        """The hashed form: every decision-relevant value, explicit.

        ``retention`` appears only when a period is set, so policies without one
        keep the hash they had before retention existed.
        """
        out: dict[str, Any] = {
            "version": self.version,
            "default": {"action": self.default.action, "threshold": self.default.threshold},
            "entities": {
                name: {"action": rule.action, "threshold": rule.threshold}
                for name, rule in sorted(self.entities.items())
            },
        }
        if retention := self.retention.canonical():
            out["retention"] = retention
        if self.allow_list:
            out["allow_list"] = sorted(normalize_allowed(v) for v in self.allow_list)
        if self.quality_block:
            out["quality"] = {"block_over": dict(sorted(self.quality_block.items()))}
        return out

    def quality_violations(self, report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The quality problems of a file's report over this policy's limits: code -> count, share, limit."""
        n = max(1, report.get("records") or 0)
        counts = {"exact_duplicates": report["exact_duplicates"]["count"],
                  "near_duplicates": report["near_duplicates"]["count"],
                  "over_max_seq_length": report["over_max_seq_length"]["count"],
                  **{code: entry["count"] for code, entry in report["problems"].items()}}
        return {code: {"count": counts.get(code, 0), "share": round(counts.get(code, 0) / n, 4), "limit": limit}
                for code, limit in sorted(self.quality_block.items()) if counts.get(code, 0) / n > limit}


def normalize_allowed(value: str) -> str:
    """An allow-list entry as compared: runs of whitespace as one space, case folded."""
    return " ".join(value.split()).casefold()


@functools.lru_cache(maxsize=64)
def _allow_pattern(values: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so that "Velvet Anchor Pro" wins over "Velvet Anchor" where both are listed.
    alternatives = sorted({normalize_allowed(v) for v in values}, key=len, reverse=True)
    body = "|".join(r"\s+".join(map(re.escape, v.split(" "))) for v in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _allow_list(value: Any, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"allow_list: must be a list of strings; got {_show(value)}")
        return ()
    if len(value) > MAX_ALLOW_LIST:
        problems.append(f"allow_list: at most {MAX_ALLOW_LIST} entries; got {len(value)}")
        return ()
    seen: dict[str, int] = {}
    out = []
    for i, entry in enumerate(value):
        path = f"allow_list[{i}]"
        if not isinstance(entry, str) or not entry.strip():
            problems.append(f"{path}: must be a non-empty string; got {_show(entry)}")
            continue
        if len(entry) > MAX_ALLOWED_VALUE_CHARS:
            problems.append(f"{path}: at most {MAX_ALLOWED_VALUE_CHARS} characters; got {len(entry)}")
            continue
        key = normalize_allowed(entry)
        if key in seen:
            problems.append(f"{path}: repeats allow_list[{seen[key]}] (entries are compared without case)")
            continue
        seen[key] = i
        out.append(" ".join(entry.split()))
    return tuple(out)


def _hash(canonical: Mapping[str, Any]) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _threshold(value: Any, path: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        problems.append(f"{path}: must be a number between 0 and 1; got {_show(value)}")
        return None
    return float(value)


def _action(value: Any, path: str, problems: list[str]) -> Action | None:
    if value not in ACTIONS:
        problems.append(f"{path}: must be one of {', '.join(ACTIONS)}; got {_show(value)}")
        return None
    return value


def _rule(value: Any, path: str, default_threshold: float | None, problems: list[str], *, is_default: bool) -> EntityRule | None:
    if isinstance(value, str):  # shorthand: just the action
        value = {"action": value}
    if not isinstance(value, Mapping):
        problems.append(
            f"{path}: must be a mapping with `action` and optional `threshold`, or an action name; got {_show(value)}"
        )
        return None
    for key in value:
        if key not in _RULE_KEYS:
            problems.append(f"{path}.{key}: unknown key; allowed keys are {', '.join(_RULE_KEYS)}")
    if "action" not in value:
        problems.append(f"{path}.action: is required (one of {', '.join(ACTIONS)})")
        action = None
    else:
        action = _action(value["action"], f"{path}.action", problems)
    if "threshold" in value:
        threshold = _threshold(value["threshold"], f"{path}.threshold", problems)
    elif is_default:
        problems.append(f"{path}.threshold: is required for the default rule (a number between 0 and 1)")
        threshold = None
    else:
        threshold = default_threshold
    if action == "pseudonymize":
        etype = path.rsplit(".", 1)[-1]
        if is_default or etype not in SURROGATE_TYPES:
            problems.append(f"{path}.action: pseudonymize is available for {', '.join(sorted(SURROGATE_TYPES))} "
                            f"(block or redact the others); got it for {'the default rule' if is_default else etype}")
            action = None
    if action is None or threshold is None:
        return None
    return EntityRule(action=action, threshold=threshold)


def _duration(value: Any, path: str, problems: list[str]) -> timedelta | None:
    match = _DURATION_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool):
            hint = " (a bare number is ambiguous: write 90d for days)"
        elif value is None:
            hint = " (omit the key to keep forever)"
        problems.append(f"{path}: must be a duration such as 90d (days) or 12h (hours){hint}; got {_show(value)}")
        return None
    hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1)
    if hours > _MAX_RETENTION_HOURS:
        problems.append(f"{path}: must be at most 36500d (100 years; omit the key to keep forever); got {_show(value)}")
        return None
    return timedelta(hours=hours)


def _quality(value: Any, problems: list[str]) -> dict[str, float]:
    """``quality: {block_over: {<problem>: <largest share of records, 0 to 1>}}``."""
    if value is None:
        return {}
    example = "(e.g. {block_over: {exact_duplicates: 0.2}})"
    if not isinstance(value, Mapping) or set(value) - {"block_over"}:
        problems.append(f"quality: must be a mapping with the one key block_over {example}; got {_show(value)}")
        return {}
    limits = value.get("block_over") or {}
    if not isinstance(limits, Mapping):
        problems.append(f"quality.block_over: must map quality problems to shares of records {example}; "
                        f"got {_show(limits)}")
        return {}
    out: dict[str, float] = {}
    for code, limit in limits.items():
        if code not in QUALITY_CODES:
            problems.append(f"quality.block_over.{code}: unknown quality problem; known ones are "
                            f"{', '.join(QUALITY_CODES)}")
        elif isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < 1:
            problems.append(f"quality.block_over.{code}: must be a share of records from 0 (block on any) to under "
                            f"1; got {_show(limit)}")
        else:
            out[code] = float(limit)
    return out


def _retention(value: Any, problems: list[str]) -> Retention:
    if value is None:
        return Retention()
    if not isinstance(value, Mapping):
        problems.append(
            f"retention: must be a mapping with optional keys {', '.join(RETENTION_KEYS)} (e.g. {{datasets: 90d}}); "
            f"got {_show(value)}"
        )
        return Retention()
    periods: dict[str, timedelta] = {}
    for key, raw in value.items():
        if key not in RETENTION_KEYS:
            problems.append(f"retention.{key}: unknown key; allowed keys are {', '.join(RETENTION_KEYS)}")
            continue
        period = _duration(raw, f"retention.{key}", problems)
        if period is not None:
            periods[key] = period
    return Retention(**periods)


def parse_policy(source: str | bytes | Mapping[str, Any], *, name: str = "policy") -> Policy:
    """Validate a policy document (YAML/JSON text or an already parsed mapping).

    Args:
        source: The document.
        name: How to call the document in error messages (e.g. its path).

    Raises:
        PolicyError: Listing every problem found, each with its key path and the
            value received.
    """
    if isinstance(source, (str, bytes)):
        try:
            doc = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise PolicyError([f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"], source=name) from None
    else:
        doc = source
    if not isinstance(doc, Mapping):
        raise PolicyError([f"(top level): must be a mapping with keys {', '.join(_TOP_KEYS)}; got {_show(doc)}"], source=name)

    problems: list[str] = []
    for key in doc:
        if key not in _TOP_KEYS:
            problems.append(f"{key}: unknown key; allowed keys are {', '.join(_TOP_KEYS)}")
    version = doc.get("version")
    if version != POLICY_VERSION or isinstance(version, bool):
        problems.append(f"version: must be {POLICY_VERSION}; got {_show(version)}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        problems.append(f"description: must be a string; got {_show(description)}")
        description = ""

    default = None
    if "default" not in doc:
        problems.append("default: is required (a mapping with `action` and `threshold`)")
    else:
        default = _rule(doc["default"], "default", None, problems, is_default=True)
    default_threshold = default.threshold if default else None

    entities: dict[str, EntityRule] = {}
    raw_entities = doc.get("entities", {})
    if raw_entities is None:
        raw_entities = {}
    if not isinstance(raw_entities, Mapping):
        problems.append(f"entities: must be a mapping of entity type to rule; got {_show(raw_entities)}")
        raw_entities = {}
    for etype, value in raw_entities.items():
        path = f"entities.{etype}"
        if etype not in SUPPORTED_ENTITIES:
            problems.append(f"{path}: unknown entity type; known types are {', '.join(sorted(SUPPORTED_ENTITIES))}")
            continue
        # A missing default threshold is already reported; check the rest anyway.
        rule = _rule(value, path, default_threshold if default_threshold is not None else 0.0, problems, is_default=False)
        if rule is not None:
            entities[etype] = rule

    retention = _retention(doc.get("retention"), problems)
    allow_list = _allow_list(doc.get("allow_list"), problems)
    quality_block = _quality(doc.get("quality"), problems)

    if problems or default is None:
        raise PolicyError(problems, source=name)
    policy = Policy(default=default, entities=MappingProxyType(entities), description=description,
                    retention=retention, allow_list=allow_list, quality_block=MappingProxyType(quality_block),
                    version=version)
    return dataclasses.replace(policy, content_hash=_hash(policy.canonical()))


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file.

    Raises:
        PolicyError: The file is invalid (every problem listed).
        InvalidRequestError: The file cannot be read (``param`` is ``policy``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"cannot read policy file {str(path)!r}: {exc.strerror if isinstance(exc, OSError) else 'not UTF-8'}",
            param="policy",
        ) from None
    return parse_policy(text, name=f"policy {path}")


#: The shipped default policy (``policies/default.yaml`` in the repository): package data of ``policies``
#: (installed with the appliance; see pyproject's package-data), read through importlib.resources, not
#: through a path relative to this file, so that it is found wherever and however the packages are
#: installed (a zipped wheel included).
DEFAULT_POLICY = importlib.resources.files("policies").joinpath("default.yaml")
#: Its name as shown in messages and ``--help``; a readable path only where the packages are plain files.
DEFAULT_POLICY_PATH = Path(str(DEFAULT_POLICY))


def default_policy_text() -> str:
    """The shipped default policy's text, read as package data."""
    return DEFAULT_POLICY.read_text(encoding="utf-8")


def load_default_policy() -> Policy:
    """The shipped default policy."""
    return parse_policy(default_policy_text(), name=f"policy {DEFAULT_POLICY_PATH}")
