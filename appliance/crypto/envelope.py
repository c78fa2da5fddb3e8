"""Envelope encryption: per-object data keys wrapped by a key-encryption key (KEK).

A :class:`KeyProvider` wraps and unwraps data keys; :class:`FileKeyProvider`
keeps the KEKs in the key file today, and an HSM or KMS provider can take its
place without touching stored data. Rotation re-wraps data keys only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.crypto.keyfile import (
    KEY_BYTES,
    Keyring,
    load_keyring,
    new_kek_id,
    remove_interrupted_writes,
    save_keyring,
)
from appliance.crypto.stream import IntegrityError

DATA_KEY_BYTES = 32
_NONCE = 12


@dataclass(frozen=True)
class WrappedKey:
    """A data key sealed under KEK ``kek_id`` (nonce ‖ AES-GCM ciphertext)."""

    kek_id: str
    blob: bytes


def new_data_key() -> bytes:
    """A fresh 256-bit data key."""
    return os.urandom(DATA_KEY_BYTES)


def _wrap_aad(kek_id: str, context: str) -> bytes:
    return f"appliance-dek/1|{kek_id}|{context}".encode()


def wrap_with(kek: bytes, kek_id: str, data_key: bytes, context: str) -> WrappedKey:
    nonce = os.urandom(_NONCE)
    return WrappedKey(kek_id, nonce + AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(kek_id, context)))


def unwrap_with(kek: bytes, wrapped: WrappedKey, context: str) -> bytes:
    try:
        return AESGCM(kek).decrypt(wrapped.blob[:_NONCE], wrapped.blob[_NONCE:], _wrap_aad(wrapped.kek_id, context))
    except InvalidTag:
        raise IntegrityError(f"data key for {context!r} does not unwrap under {wrapped.kek_id}") from None


class KeyProvider(Protocol):
    """Wraps and unwraps data keys; the only holder of key-encryption keys."""

    def active_kek_id(self) -> str:
        """The KEK new data keys are wrapped under."""
        ...

    def wrap(self, data_key: bytes, context: str) -> WrappedKey:
        """Seal ``data_key`` for the object named by ``context``."""
        ...

    def unwrap(self, wrapped: WrappedKey, context: str) -> bytes:
        """Open a wrapped data key; :class:`IntegrityError` if it does not authenticate."""
        ...


class KeyUnavailableError(IntegrityError):
    """The KEK a data key was wrapped under is not in the keyring."""

    code = "key_unavailable"


class FileKeyProvider:
    """KEKs from the key file (``APPLIANCE_KEY_FILE``), re-read after rotation.

    Args:
        path: The keyring file, mode 0600.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._keyring: Keyring = load_keyring(path)

    def _file_stamp(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        """Pick up a rotation done by another process (``appliance keys rotate``)."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._keyring, self._stamp = load_keyring(self.path), stamp

    @property
    def keyring(self) -> Keyring:
        """The KEKs currently loaded (for rotation; never log it)."""
        return self._keyring

    def active_kek_id(self) -> str:
        return self._keyring.active

    def kek_ids(self) -> list[str]:
        return sorted(self._keyring.keys)

    def wrap(self, data_key: bytes, context: str) -> WrappedKey:
        self._refresh()
        ring = self._keyring
        return wrap_with(ring.active_key, ring.active, data_key, context)

    def unwrap(self, wrapped: WrappedKey, context: str) -> bytes:
        kek = self._keyring.keys.get(wrapped.kek_id)
        if kek is None:
            self._refresh()
            kek = self._keyring.keys.get(wrapped.kek_id)
        if kek is None:
            raise KeyUnavailableError(
                f"key-encryption key {wrapped.kek_id} is not in {self.path}; the data key cannot be opened"
            )
        return unwrap_with(kek, wrapped, context)

    # -- rotation (file provider specific) ---------------------------------
    def add_active_kek(self) -> str:
        """Add a fresh KEK and make it active, keeping the old ones for unwrapping."""
        with self._lock:
            kid = new_kek_id()
            keys = dict(self._keyring.keys)
            keys[kid] = os.urandom(KEY_BYTES)
            self._keyring = Keyring(active=kid, keys=keys)
            save_keyring(self.path, self._keyring)
            self._stamp = self._file_stamp()
            return kid

    def retire_all_but_active(self) -> list[str]:
        """Drop every KEK but the active one from the file, and from copies a crash left; returns the ids dropped."""
        with self._lock:
            ring = self._keyring
            dropped = sorted(k for k in ring.keys if k != ring.active)
            self._keyring = Keyring(active=ring.active, keys={ring.active: ring.active_key})
            save_keyring(self.path, self._keyring)
            self._stamp = self._file_stamp()
            remove_interrupted_writes(self.path)
            return dropped
