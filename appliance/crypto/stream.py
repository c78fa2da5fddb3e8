"""Streaming authenticated encryption of blobs (AES-256-GCM over fixed-size segments).

Layout of an encrypted blob (all integers big-endian)::

    header  = MAGIC(4) | VERSION(1) | SEGMENT_SIZE(4) | SALT(32) | NONCE_PREFIX(7)      48 bytes
    segment = AES-GCM(K, nonce_i, plaintext_i, aad=header|context)                     <= SEGMENT_SIZE + 16

    K       = HKDF-SHA256(data key, salt=SALT, info=INFO|context)
    nonce_i = NONCE_PREFIX(7) | i (4) | last (1: 0x01 on the final segment, else 0x00)

``context`` binds the object id, its project and the format version, so a blob
moved to another object fails to decrypt. Because the segment counter and the
last-segment flag are in the nonce, flipping a byte, reordering or swapping
segments, and truncating (dropping the final segment, or cutting inside one)
all fail authentication. This is the construction of Tink's AES-GCM-HKDF
streaming AEAD and age's STREAM.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.errors import ApplianceError

MAGIC = b"APLB"
VERSION = 1
SEGMENT_SIZE = 64 * 1024
TAG_SIZE = 16
SALT_SIZE = 32
PREFIX_SIZE = 7
HEADER = struct.Struct(f">4sBI{SALT_SIZE}s{PREFIX_SIZE}s")
INFO = b"appliance-blob/1"
MAX_SEGMENTS = 2**32


class IntegrityError(ApplianceError):
    """Stored ciphertext failed authentication: tampered, reordered, truncated or wrong key."""

    code = "integrity_error"


def blob_context(object_id: str, project: str) -> bytes:
    """Associated data binding a blob to its object, project and format version."""
    return f"appliance-blob/{VERSION}|{object_id}|{project}".encode()


def _derive(data_key: bytes, salt: bytes, context: bytes) -> AESGCM:
    if len(data_key) != 32:
        raise ValueError(f"data key must be 32 bytes; got {len(data_key)}")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=INFO + b"|" + context).derive(data_key)
    return AESGCM(key)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= MAX_SEGMENTS:
        raise ValueError("blob too large: segment counter exhausted")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


class SegmentEncryptor:
    """Incremental encryptor: feed plaintext with :meth:`update`, then call :meth:`finish`.

    Output chunks (header first, then whole segments) are returned by each call
    so the caller can write them straight to the blob file; at most one
    segment of plaintext is buffered.
    """

    def __init__(self, data_key: bytes, context: bytes, segment_size: int = SEGMENT_SIZE) -> None:
        salt, self._prefix = os.urandom(SALT_SIZE), os.urandom(PREFIX_SIZE)
        self._segment_size = segment_size
        self._header = HEADER.pack(MAGIC, VERSION, segment_size, salt, self._prefix)
        self._aad = self._header + context
        self._aead = _derive(data_key, salt, context)
        self._buffer = bytearray()
        self._index = 0
        self._header_sent = False
        self._finished = False
        self.plaintext_bytes = 0

    def _emit(self, chunk: bytes, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last), chunk, self._aad)
        self._index += 1
        return sealed

    def update(self, data: bytes) -> bytes:
        if self._finished:
            raise ValueError("encryptor already finished")
        self.plaintext_bytes += len(data)
        self._buffer += data
        out = bytearray()
        if not self._header_sent:
            out += self._header
            self._header_sent = True
        # Keep at least one byte back: the final segment must be flagged last,
        # and we only know which one is last at finish().
        while len(self._buffer) > self._segment_size:
            out += self._emit(bytes(self._buffer[: self._segment_size]), last=False)
            del self._buffer[: self._segment_size]
        return bytes(out)

    def finish(self) -> bytes:
        out = bytearray()
        if not self._header_sent:
            out += self._header
            self._header_sent = True
        out += self._emit(bytes(self._buffer), last=True)
        self._buffer.clear()
        self._finished = True
        return bytes(out)


def encrypt_chunks(data_key: bytes, context: bytes, chunks: Iterable[bytes], segment_size: int = SEGMENT_SIZE) -> Iterator[bytes]:
    """Encrypt an iterable of plaintext chunks into ciphertext chunks."""
    enc = SegmentEncryptor(data_key, context, segment_size)
    for chunk in chunks:
        out = enc.update(chunk)
        if out:
            yield out
    yield enc.finish()


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = fh.read(n - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def decrypt_stream(data_key: bytes, context: bytes, fh: BinaryIO) -> Iterator[bytes]:
    """Yield the plaintext of an encrypted blob segment by segment.

    Raises:
        IntegrityError: on any authentication failure, a bad header, or a
            truncated blob. Plaintext yielded before the failure must be
            discarded by the caller; nothing after it is released.
    """
    header = _read_exact(fh, HEADER.size)
    if len(header) != HEADER.size:
        raise IntegrityError("encrypted blob is truncated (incomplete header)")
    magic, version, segment_size, salt, prefix = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION or not 0 < segment_size <= 64 * 1024 * 1024:
        raise IntegrityError("encrypted blob has an unknown header")
    aead = _derive(data_key, salt, context)
    aad = header + context
    sealed_size = segment_size + TAG_SIZE
    index = 0
    current = _read_exact(fh, sealed_size)
    while True:
        following = _read_exact(fh, sealed_size) if len(current) == sealed_size else b""
        last = not following
        if len(current) < TAG_SIZE:
            raise IntegrityError("encrypted blob is truncated")
        try:
            plain = aead.decrypt(_nonce(prefix, index, last), current, aad)
        except InvalidTag:
            raise IntegrityError(
                f"encrypted blob failed authentication at segment {index}: tampered, reordered, truncated "
                "or encrypted under another key"
            ) from None
        yield plain
        if last:
            return
        index += 1
        current = following
