"""Secret-shaped substrings out of text that may reach a log, a client or a proxy.

Lives in :mod:`serving` because error messages are scrubbed where the error is
made (:class:`serving.errors.ServingError`), and serving imports nothing from
the appliance; :mod:`appliance.logs` uses the same :func:`scrub` for log records.
"""

from __future__ import annotations

import re

__all__ = ["scrub"]

_SCRUB_PATTERNS = [
    (re.compile(r"apl_[0-9a-f]{12}_[A-Za-z0-9_-]{8,}"), "apl_[REDACTED]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 [REDACTED]"),
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
        "[REDACTED PRIVATE KEY]",
    ),
]


def scrub(text: str) -> str:
    """Replace token-, bearer- and private-key-shaped substrings with placeholders."""
    for pattern, replacement in _SCRUB_PATTERNS:
        text = pattern.sub(replacement, text)
    return text
