"""Framing of messages between the scheduler and a worker over pipes.

A frame is ``len(header) (4 bytes) | len(payload) (8 bytes) | header JSON | payload``,
both lengths big-endian; the header is a small JSON object with a ``type``,
the payload raw bytes. Every frame is bounded (:data:`MAX_HEADER`,
:data:`MAX_PAYLOAD`): a reader refuses a larger declared length before it
buffers a byte of it, so a corrupt or hostile length costs nothing. Anything
bigger (checkpoints, adapters, result images, the resume checkpoint) travels
as a stream of chunk frames (:mod:`appliance.jobs.streams`). Only these
pipes, or for a remote worker the encrypted :mod:`appliance.jobs.tunnel`,
carry data keys and artefacts.
"""

from __future__ import annotations

import json
import os
import select
import struct
from typing import Any

PREFIX = struct.Struct(">IQ")
#: Largest header JSON a reader accepts (the start frame, with its keys and probe targets, is a few KiB).
MAX_HEADER = 1 << 20
#: Largest payload a reader accepts in one frame; streams send chunks well below it.
MAX_PAYLOAD = 16 << 20
#: Largest whole frame, prefix included.
MAX_FRAME = PREFIX.size + MAX_HEADER + MAX_PAYLOAD
_READ_BYTES = 1 << 20


class FrameError(ValueError):
    """Bytes that are not a well-formed frame: a bad length, a truncated frame, a header that is not JSON."""


def check_lengths(header_len: int, payload_len: int) -> None:
    """Raise :class:`FrameError` unless a frame's declared lengths are within the limits."""
    if header_len > MAX_HEADER:
        raise FrameError(f"frame header of {header_len} bytes declared; the limit is {MAX_HEADER} "
                         "(a corrupt stream, or a peer of another version)")
    if payload_len > MAX_PAYLOAD:
        raise FrameError(f"frame payload of {payload_len} bytes declared; the limit is {MAX_PAYLOAD}: "
                         "larger artefacts must be sent as a stream of chunks (appliance.jobs.streams)")


def encode_prefix(header: dict[str, Any], payload_len: int) -> bytes:
    """The length prefix and header JSON of a frame whose payload of ``payload_len`` bytes follows."""
    head = json.dumps(header, separators=(",", ":")).encode()
    check_lengths(len(head), payload_len)
    return PREFIX.pack(len(head), payload_len) + head


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return encode_prefix(header, len(payload)) + payload


def _parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw))
    except ValueError:
        raise FrameError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The ``(header, payload)`` that :func:`encode` made; FrameError unless ``data`` is exactly one frame."""
    if len(data) < PREFIX.size:
        raise FrameError("truncated frame")
    hlen, plen = PREFIX.unpack_from(data)
    check_lengths(hlen, plen)
    if PREFIX.size + hlen + plen != len(data):
        raise FrameError("frame length mismatch")
    return _parse_header(data[PREFIX.size:PREFIX.size + hlen]), bytes(data[PREFIX.size + hlen:])


def write_frame(fd: int, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    """Write one whole frame to a raw fd (blocking); the payload is not copied."""
    for part in (memoryview(encode_prefix(header, len(payload))), memoryview(payload).cast("B")):
        while part:
            written = os.write(fd, part)
            part = part[written:]


class FrameReader:
    """Reads frames from a raw fd, with timeouts, without a buffered file object.

    It buffers at most one frame (and never more than the limits allow): the
    declared lengths are checked as soon as the prefix is in, before reading on.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._need = PREFIX.size
        self.eof = False

    def _fill(self, timeout: float | None) -> bool:
        if timeout is not None:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return False
        chunk = os.read(self.fd, max(min(self._need - len(self._buf), _READ_BYTES), 65536))
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    def _try_parse(self) -> tuple[dict[str, Any], bytes] | None:
        if len(self._buf) < PREFIX.size:
            self._need = PREFIX.size
            return None
        hlen, plen = PREFIX.unpack_from(self._buf)
        check_lengths(hlen, plen)
        total = PREFIX.size + hlen + plen
        if len(self._buf) < total:
            self._need = total
            return None
        header = _parse_header(self._buf[PREFIX.size:PREFIX.size + hlen])
        payload = bytes(self._buf[PREFIX.size + hlen:total])
        del self._buf[:total]
        self._need = PREFIX.size
        return header, payload

    def read(self, timeout: float | None = None) -> tuple[dict[str, Any], bytes] | None:
        """The next frame; ``None`` on timeout or end of stream (see :attr:`eof`).

        Raises:
            FrameError: The stream is not well-formed (absurd lengths, a header that is not JSON).
        """
        while True:
            frame = self._try_parse()
            if frame is not None:
                return frame
            if self.eof or not self._fill(timeout):
                return None
