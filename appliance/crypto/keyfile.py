"""The master key file: a keyring of key-encryption keys (KEKs).

Format (JSON, mode 0600)::

    {"format": "appliance-keyring/1", "active": "kek-<hex>", "keys": {"kek-<hex>": "<base64 32 bytes>"}}

The active KEK wraps new data keys; older KEKs stay until every data key they
wrapped has been re-wrapped (key rotation). The file is refused if group or
others can read it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError, NotInitializedError

FORMAT = "appliance-keyring/1"
KEY_BYTES = 32


class KeyFileError(ApplianceError):
    """The key file is missing, unreadable, too permissive or malformed."""

    code = "key_file_invalid"


@dataclass(frozen=True)
class Keyring:
    """KEKs by id and which one wraps new data keys."""

    active: str
    keys: dict[str, bytes]

    def __repr__(self) -> str:  # never print key bytes
        return f"Keyring(active={self.active!r}, ids={sorted(self.keys)!r})"

    @property
    def active_key(self) -> bytes:
        return self.keys[self.active]


def new_kek_id() -> str:
    return f"kek-{secrets.token_hex(8)}"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_keyring(path: Path, keyring: Keyring) -> None:
    doc = {
        "format": FORMAT,
        "active": keyring.active,
        "keys": {kid: base64.b64encode(key).decode() for kid, key in keyring.keys.items()},
    }
    _write_private(path, json.dumps(doc, indent=1).encode())


def remove_interrupted_writes(path: Path) -> int:
    """Delete copies of the key file that a killed :func:`save_keyring` left; returns how many.

    Such a copy may hold KEKs that a rotation has since retired: once rotation is done, no old
    KEK may remain anywhere on disk.
    """
    stale = list(path.parent.glob(f".{path.name}.*.tmp"))  # named as _write_private names them
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def create_keyring(path: Path) -> Keyring:
    """Create a new key file holding one fresh random KEK; refuse to overwrite."""
    if path.exists():
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it", param="APPLIANCE_KEY_FILE")
    kid = new_kek_id()
    keyring = Keyring(active=kid, keys={kid: secrets.token_bytes(KEY_BYTES)})
    save_keyring(path, keyring)
    return keyring


def load_keyring(path: Path) -> Keyring:
    """Read and check the key file named by ``APPLIANCE_KEY_FILE``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotInitializedError(
            f"key file {path} does not exist; run `appliance init` first or set APPLIANCE_KEY_FILE",
            param="APPLIANCE_KEY_FILE",
        ) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 (chmod 600 {path})",
            param="APPLIANCE_KEY_FILE",
        )
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        keys = {kid: base64.b64decode(b64, validate=True) for kid, b64 in doc["keys"].items()}
        if any(len(k) != KEY_BYTES for k in keys.values()):
            raise ValueError(f"every key must be {KEY_BYTES} bytes")
        if doc["active"] not in keys:
            raise ValueError("the active key id is not in the keyring")
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is malformed: {exc}", param="APPLIANCE_KEY_FILE") from None
    return Keyring(active=doc["active"], keys=keys)
