"""Surrogates for the ``pseudonymize`` action: consistent, type-appropriate, keyed fakes.

``redact`` leaves a hole (``<PERSON>``) that a model learns to say; ``pseudonymize``
puts a realistic stand-in in its place, so the text keeps its shape: ``Maria
Kowalczyk`` becomes, say, ``Dorothy Hensley`` everywhere in the dataset,
``maria.k@corp.example`` becomes ``dorothy.hensley@example.com``. The choice is
an HMAC-SHA256 of the type and the (normalised) value under a secret of the
dataset (derived from its data key, so crypto-shredding the dataset destroys
it too): the same value maps to the same surrogate within a dataset, and
without the key nobody can tell which real value a surrogate stands for, nor
link surrogates across datasets.

Surrogates never come from the real value's own letters, and the reserved
ranges keep them harmless outside the dataset: ``example.com`` addresses
(RFC 2606), the 555-01xx fictional phone numbers, documentation IP blocks
(RFC 5737). Only the types below have surrogates; a policy that asks to
pseudonymize another type is refused (secrets and financial identifiers are
blocked or redacted, never imitated).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib.resources

#: The name lists are package data of ``appliance.scanning`` (``scanning/data/*.txt``), read through
#: importlib.resources rather than a path relative to this module.
_DATA = importlib.resources.files("appliance.scanning").joinpath("data")

#: Entity types that ``pseudonymize`` applies to.
SURROGATE_TYPES = frozenset({"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "LOCATION"})

#: Placeholder cities for LOCATION: common place names, each found in several countries.
_PLACES = ("Springfield", "Riverside", "Fairview", "Georgetown", "Franklin", "Greenville", "Bristol", "Clinton",
           "Salem", "Madison", "Ashland", "Oakland", "Milton", "Newport", "Dover", "Lakewood", "Kingston",
           "Arlington", "Burlington", "Manchester", "Clayton", "Chester", "Marion", "Oxford", "Winchester")
_TEST_NETS = ("192.0.2", "198.51.100", "203.0.113")


@functools.cache
def _names(file: str, limit: int) -> tuple[str, ...]:
    """The ``limit`` first (most frequent) names of a bundled list, title-case."""
    with _DATA.joinpath(file).open(encoding="utf-8") as fh:
        names = [line.strip().title() for line in fh if line.strip() and not line.startswith("#")]
    return tuple(n for n in names[:limit] if n.isalpha())


class Surrogates:
    """Maps real values to surrogates, consistently, under one dataset's secret.

    Args:
        secret: At least 16 bytes, private to the dataset.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError(f"`secret` must be at least 16 bytes; got {len(secret)}")
        self._secret = secret

    def _draw(self, entity_type: str, value: str, attempt: int) -> int:
        normal = " ".join(value.split()).casefold()
        msg = f"{entity_type}\0{normal}\0{attempt}".encode()
        return int.from_bytes(hmac.new(self._secret, msg, hashlib.sha256).digest()[:8], "big")

    def value(self, entity_type: str, original: str) -> str:
        """The surrogate of ``original``, an ``entity_type`` value (one of :data:`SURROGATE_TYPES`)."""
        if entity_type not in SURROGATE_TYPES:
            raise ValueError(f"no surrogates for {entity_type!r}; only for {', '.join(sorted(SURROGATE_TYPES))}")
        for attempt in range(8):
            out = self._make(entity_type, original, self._draw(entity_type, original, attempt))
            if out.casefold() != original.casefold():
                return out
        return f"<{entity_type}>"  # eight draws all equal to the value: vanishingly unlikely

    @staticmethod
    def _make(entity_type: str, original: str, n: int) -> str:
        given, surnames = _names("given_names.txt", 2000), _names("surnames.txt", 5000)
        first, last = given[n % len(given)], surnames[(n // len(given)) % len(surnames)]
        if entity_type == "PERSON":
            # Keep the shape: one word stays one word (a first name), more become a full name.
            return first if len(original.split()) == 1 else f"{first} {last}"
        if entity_type == "EMAIL_ADDRESS":
            return f"{first.lower()}.{last.lower()}@example.com"
        if entity_type == "PHONE_NUMBER":
            return f"+1 {200 + n % 800} 555 01{(n // 800) % 100:02d}"
        if entity_type == "IP_ADDRESS":
            if ":" in original:  # IPv6: the documentation prefix (RFC 3849)
                return f"2001:db8::{n % 0xFFFF:x}"
            return f"{_TEST_NETS[n % 3]}.{1 + (n // 3) % 254}"
        return _PLACES[n % len(_PLACES)]  # LOCATION
