"""Streaming AEAD: round trips, and every kind of tampering fails loudly."""

from __future__ import annotations

import io
import os

import pytest

from appliance.crypto.stream import HEADER, TAG_SIZE, IntegrityError, blob_context, decrypt_stream, encrypt_chunks

SEG = 1024
KEY = os.urandom(32)
CTX = blob_context("file-abc", "acme")


def seal(plain: bytes, chunk: int = 700, key: bytes = KEY, ctx: bytes = CTX) -> bytes:
    return b"".join(encrypt_chunks(key, ctx, (plain[i:i + chunk] for i in range(0, len(plain), chunk)), SEG))


def open_(blob: bytes, key: bytes = KEY, ctx: bytes = CTX) -> bytes:
    return b"".join(decrypt_stream(key, ctx, io.BytesIO(blob)))


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 5 * SEG + 17])
def test_round_trip_any_size(size):
    plain = os.urandom(size)
    blob = seal(plain)
    n_segments = max(1, -(-size // SEG))
    assert len(blob) == HEADER.size + size + n_segments * TAG_SIZE
    assert open_(blob) == plain


def test_ciphertext_reveals_nothing_of_the_plaintext_and_is_randomised():
    plain = b"alice@example.com " * 200
    a, b = seal(plain), seal(plain)
    assert b"alice" not in a and a != b


def segments(blob: bytes) -> list[bytes]:
    body = blob[HEADER.size:]
    return [body[i:i + SEG + TAG_SIZE] for i in range(0, len(body), SEG + TAG_SIZE)]


def test_flipping_any_byte_fails():
    blob = bytearray(seal(os.urandom(3 * SEG + 5)))
    for pos in (0, 5, HEADER.size - 1, HEADER.size + 3, HEADER.size + SEG + TAG_SIZE + 1, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            open_(bytes(tampered))


def test_swapping_two_segments_fails():
    blob = seal(os.urandom(3 * SEG + 5))
    s = segments(blob)
    with pytest.raises(IntegrityError, match="segment 0"):
        open_(blob[:HEADER.size] + s[1] + s[0] + s[2] + s[3])


@pytest.mark.parametrize("cut", ["final segment", "inside segment", "header", "all segments"])
def test_truncation_fails(cut):
    blob = seal(os.urandom(3 * SEG + 5))
    s = segments(blob)
    truncated = {
        "final segment": blob[:HEADER.size] + b"".join(s[:-1]),
        "inside segment": blob[:-3],
        "header": blob[:HEADER.size - 1],
        "all segments": blob[:HEADER.size],
    }[cut]
    with pytest.raises(IntegrityError):
        open_(truncated)


def test_appending_a_segment_fails():
    blob = seal(os.urandom(2 * SEG))
    with pytest.raises(IntegrityError):
        open_(blob + segments(blob)[0])


def test_wrong_key_or_other_object_context_fails():
    blob = seal(b"secret data")
    with pytest.raises(IntegrityError):
        open_(blob, key=os.urandom(32))
    with pytest.raises(IntegrityError):
        open_(blob, ctx=blob_context("file-other", "acme"))
    with pytest.raises(IntegrityError):
        open_(blob, ctx=blob_context("file-abc", "globex"))
