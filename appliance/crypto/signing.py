"""Ed25519 signatures over manifests (and, later, audit checkpoints).

The signing key lives next to the master key (``keys/signing.key``, mode
0600) and is created on first use. Signatures cover the canonical JSON of the
document, so anyone holding the public key can verify an exported manifest.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_lock = threading.Lock()


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The appliance's signing key; generated (0600) the first time it is needed."""
    with _lock:
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            return key
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return key


def public_key_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def sign(key: Ed25519PrivateKey, doc: dict[str, Any]) -> str:
    return base64.b64encode(key.sign(canonical(doc))).decode()


def verify(public: Ed25519PublicKey, doc: dict[str, Any], signature: str) -> bool:
    try:
        public.verify(base64.b64decode(signature), canonical(doc))
    except (InvalidSignature, ValueError):
        return False
    return True
