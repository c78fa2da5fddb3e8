"""Password hashing with scrypt (memory-hard), encoded with its parameters."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from appliance.errors import InvalidRequestError

N, R, P = 2**14, 8, 1
MIN_LENGTH = 12


def check_strength(password: str, *, param: str = "password") -> None:
    if len(password) < MIN_LENGTH:
        raise InvalidRequestError(f"`{param}` must be at least {MIN_LENGTH} characters; got {len(password)}",
                                  param=param)


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of ``password``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${N}${R}${P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Constant-time check; False for users without a password."""
    if not encoded:
        # Spend the same time as a real check so timing does not reveal which users exist.
        hashlib.scrypt(password.encode(), salt=b"0" * 16, n=N, r=R, p=P, dklen=32)
        return False
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)
