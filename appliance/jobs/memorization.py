"""The job's ``memorization`` option: canaries and the extraction probe (validated cheaply, no torch).

A job may carry ``"memorization": {"canaries": 4, "canary_repetitions": 10,
"extraction_probe": true, "probe_samples": 32}``. Canary sentences with fresh
random secrets are drawn when the job is created and recorded in the job row
(never shown by the API: they are the reference an auditor checks the
exposure figures against), so a resumed run trains on the same ones. The
extraction probe is on by default for LLM jobs; canaries are off by default
(they add training data). Canary records are at most :data:`MAX_CANARY_SHARE` of
the training examples (:func:`fit_canaries`): the default repetitions shrink to
fit a small dataset, and a request that cannot fit is refused naming its field.
"""

from __future__ import annotations

import math
from typing import Any

from appliance.errors import InvalidRequestError
from appliance.training.data import holdout_size

DEFAULTS = {"canaries": 0, "canary_repetitions": 10, "extraction_probe": True, "probe_samples": 32}
#: Canary records (canaries x repetitions) may be at most this share of the training examples: more, and
#: they would outweigh the data (4 x 10 canaries in a 22-record dataset made 62 training examples).
MAX_CANARY_SHARE = 0.05
_LIMITS = {"canaries": (0, 16), "canary_repetitions": (1, 100), "probe_samples": (1, 256)}


def parse_memorization(value: Any, *, base_kind: str) -> dict[str, Any]:
    """The validated option with defaults filled in; every problem reported at once."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"`memorization` must be an object; got {type(value).__name__}",
                                  param="memorization")
    problems = [f"`memorization.{k}` is not a known field (known: {', '.join(DEFAULTS)})"
                for k in value if k not in DEFAULTS]
    out = dict(DEFAULTS)
    for key, (low, high) in _LIMITS.items():
        if key in value:
            v = value[key]
            if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
                problems.append(f"`memorization.{key}` must be an integer in [{low}, {high}]; got {v!r}")
            else:
                out[key] = v
    if "extraction_probe" in value:
        if not isinstance(value["extraction_probe"], bool):
            problems.append(f"`memorization.extraction_probe` must be true or false; got {value['extraction_probe']!r}")
        else:
            out["extraction_probe"] = value["extraction_probe"]
    if problems:
        raise InvalidRequestError("; ".join(problems), param="memorization")
    if base_kind != "llm":
        if value and (out["canaries"] or "extraction_probe" in value):
            raise InvalidRequestError("`memorization` applies to language-model jobs only", param="memorization")
        return {}
    return out


def public_view(stored: dict[str, Any] | None) -> dict[str, Any]:
    """What the API shows of the stored option: the settings, not the canary secrets."""
    return {k: v for k, v in (stored or {}).items() if k != "canary_texts"}


def training_examples(records: int, has_validation_file: bool) -> int:
    """How many of a training file's records are trained on: without a validation file, some are held out
    (:func:`appliance.training.data.holdout_size`)."""
    return records if has_validation_file else records - holdout_size(records)


def fit_canaries(option: dict[str, Any], examples: int, requested: dict[str, Any] | None) -> dict[str, Any]:
    """The option with canary repetitions that keep canaries within :data:`MAX_CANARY_SHARE` of ``examples``.

    Repetitions left at their default shrink to fit; asked-for repetitions or canaries that cannot fit
    are refused.

    Raises:
        InvalidRequestError: ``param`` ``memorization.canaries`` or ``memorization.canary_repetitions``,
            naming the most that fits.
    """
    canaries = option.get("canaries") or 0
    if not canaries:
        return option
    budget = int(MAX_CANARY_SHARE * examples)
    share = f"{MAX_CANARY_SHARE:.0%} of the {examples} training examples"
    if canaries > budget:
        most = f"at most {budget} canaries" if budget else "no canaries"
        raise InvalidRequestError(
            f"`memorization.canaries` {canaries}: even once each they would be more than {share}; use {most}, "
            f"or a larger training file (at least {math.ceil(canaries / MAX_CANARY_SHARE)} examples "
            f"for {canaries})", param="memorization.canaries")
    most = budget // canaries
    asked = (requested or {}).get("canary_repetitions")
    if asked is not None and asked > most:
        raise InvalidRequestError(
            f"`memorization.canary_repetitions` {asked}: {canaries} canaries x {asked} would be more than {share}; "
            f"use at most {most}", param="memorization.canary_repetitions")
    return {**option, "canary_repetitions": min(option["canary_repetitions"], most)}
