"""The job's ``memorization`` option: canaries and the extraction probe (validated cheaply, no torch).

A job may carry ``"memorization": {"canaries": 4, "canary_repetitions": 10,
"extraction_probe": true, "probe_samples": 32}``. Canary sentences with fresh
random secrets are drawn when the job is created and recorded in the job row
(never shown by the API: they are the reference an auditor checks the
exposure figures against), so a resumed run trains on the same ones. The
extraction probe is on by default for LLM jobs; canaries are off by default
(they add training data).
"""

from __future__ import annotations

from typing import Any

from appliance.errors import InvalidRequestError

DEFAULTS = {"canaries": 0, "canary_repetitions": 10, "extraction_probe": True, "probe_samples": 32}
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
