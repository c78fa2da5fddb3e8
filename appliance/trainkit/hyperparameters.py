"""The machinery behind each modality's hyperparameters: ``method`` parsing, field checks, ``"auto"``.

A job names ``method: {"type": <t>, <t>: {"hyperparameters": {...}}}``; each
modality keeps a table ``method.type -> hyperparameters dataclass`` (its field
rules and ``"auto"`` values). This module parses the object against such a
table, reporting *every* problem at once as ``(param, message)``, and offers
the checks the field rules are written with. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from appliance.errors import InvalidRequestError
from appliance.trainkit.errors import HyperparameterError

Auto = Literal["auto"]
AUTO: Auto = "auto"
_OR_AUTO = ' or "auto"'


def prefix(method: str) -> str:
    """Where a method's hyperparameters are in a job: ``method.<method>.hyperparameters``."""
    return f"method.{method}.hyperparameters"


def raise_if(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise HyperparameterError(problems)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class FieldChecks:
    """Collects the problems of one hyperparameters object, each as ``(<prefix>.<field>, "<rule>; got <value>")``.

    Checks of fields the object does not have are skipped, so one list of
    rules serves every method of a modality.

    Args:
        hp: The hyperparameters dataclass instance.
        at_least: How a lower bound other than 1 is worded (``an integer of at least``).
    """

    def __init__(self, hp: Any, *, at_least: str = "an integer of at least") -> None:
        self.hp = hp
        self.prefix = prefix(hp.method)
        self.at_least = at_least
        self.fields = {f.name for f in dataclasses.fields(hp)}
        self.problems: list[tuple[str, str]] = []

    def bad(self, field: str, rule: str) -> None:
        self.problems.append((f"{self.prefix}.{field}", f"{rule}; got {getattr(self.hp, field)!r}"))

    def int_in(self, field: str, low: int, high: int, *, auto: bool = True) -> None:
        if field not in self.fields:
            return
        value = getattr(self.hp, field)
        if auto and value == AUTO:
            return
        if not is_int(value) or not low <= value <= high:
            what = "a positive integer" if low == 1 else f"{self.at_least} {low}"
            self.bad(field, f"must be {what} (at most {high}){_OR_AUTO if auto else ''}")

    def number(self, field: str, rule: str, ok: Callable[[Any], bool], *, auto: bool = True,
               none: bool = False) -> None:
        if field not in self.fields:
            return
        value = getattr(self.hp, field)
        if (auto and value == AUTO) or (none and value is None):
            return
        if not is_number(value) or not ok(value):
            self.bad(field, f"must be {rule}{_OR_AUTO if auto else ''}{' or null' if none else ''}")


def check_spec(method: str, hyperparameters: Any, table: Mapping[str, type]) -> None:
    """A spec's ``(method, hyperparameters)`` pair is consistent with ``table``.

    Raises:
        InvalidRequestError: Unknown method, or hyperparameters of another class.
    """
    expected = table.get(method)
    if expected is None:
        raise InvalidRequestError(
            f"`method.type` must be one of {', '.join(map(repr, table))}; got {method!r}",
            param="method.type",
        )
    if not isinstance(hyperparameters, expected):
        raise InvalidRequestError(
            f"`method.{method}.hyperparameters` must be {expected.__name__}; "
            f"got {type(hyperparameters).__name__}",
            param=f"method.{method}.hyperparameters",
        )


def parse_method(
    method: Mapping[str, Any] | None,
    table: Mapping[str, type],
    *,
    default: str,
    unknown: Callable[[str, str, set[str]], str],
) -> tuple[str, Any]:
    """``(method type, hyperparameters)`` from a job's ``method`` object, validated against ``table``.

    Unknown keys are errors (a misspelt ``lora_rank`` must not be ignored).

    Args:
        method: The job's ``method``; ``None`` means ``default`` with every hyperparameter at its default.
        table: ``method.type`` -> hyperparameters dataclass.
        default: The type when ``method`` is ``None`` or names none.
        unknown: ``(method type, field, known fields)`` -> the message for an unknown hyperparameter.

    Raises:
        HyperparameterError: Listing every problem found.
    """
    if method is None:
        return default, table[default]()
    if not isinstance(method, Mapping):
        raise HyperparameterError([("method", f"must be an object; got {type(method).__name__}")])
    kind = method.get("type", default)
    if not isinstance(kind, str) or kind not in table:
        got = repr(kind) if isinstance(kind, str) else type(kind).__name__
        raise HyperparameterError([("method.type", f"must be one of {', '.join(map(repr, table))}; got {got}")])
    problems = [
        (f"method.{key}", f"is not allowed with method.type {kind!r}") for key in method if key not in ("type", kind)
    ]
    body = method.get(kind) or {}
    if not isinstance(body, Mapping):
        raise HyperparameterError(problems + [(f"method.{kind}", f"must be an object; got {type(body).__name__}")])
    problems += [(f"method.{kind}.{key}", "is not a known field") for key in body if key != "hyperparameters"]
    raw = body.get("hyperparameters") or {}
    if not isinstance(raw, Mapping):
        raise HyperparameterError(
            problems + [(f"method.{kind}.hyperparameters", f"must be an object; got {type(raw).__name__}")]
        )
    hp_cls = table[kind]
    known = {f.name for f in dataclasses.fields(hp_cls)}
    problems += [(f"{prefix(kind)}.{key}", unknown(kind, key, known)) for key in raw if key not in known]
    hp = None
    try:
        hp = hp_cls(**{k: v for k, v in raw.items() if k in known})
    except HyperparameterError as exc:
        problems += exc.problems
    raise_if(problems)
    return kind, hp
