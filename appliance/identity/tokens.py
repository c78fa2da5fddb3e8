"""API token format: ``apl_<token id>_<secret>``.

The token id (48 random bits, hex) is public and names the token in lists,
audit events and revocation. The secret is 256 random bits (43 url-safe
base64 characters) and is never stored: only its SHA-256 is. A plain hash is
the right tool for a uniformly random 256-bit secret; slow password hashes
protect low-entropy passwords and would only cost latency here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "apl"
_TOKEN_RE = re.compile(r"^apl_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
#: Matches anything token-shaped in free text; used to scrub logs.
TOKEN_PATTERN = re.compile(r"apl_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")


@dataclass(frozen=True)
class IssuedToken:
    """A freshly minted token: ``value`` is shown once, ``secret_hash`` is stored."""

    token_id: str
    value: str
    secret_hash: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def mint() -> IssuedToken:
    """A new random token."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)  # 32 bytes = 256 bits -> 43 characters
    return IssuedToken(token_id=token_id, value=f"{PREFIX}_{token_id}_{secret}", secret_hash=hash_secret(secret))


def parse(value: str) -> tuple[str, str] | None:
    """``(token_id, secret)`` of a well-formed token, else ``None``."""
    match = _TOKEN_RE.match(value)
    if match is None:
        return None
    return match.group(1), match.group(2)


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret with the stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
