"""Framing of messages between the scheduler and a worker over pipes.

A frame is ``len(header) (4 bytes) | len(payload) (4 bytes) | header JSON | payload``;
the header is a small JSON object with a ``type``, the payload raw bytes
(artefacts, checkpoints). Only these pipes, or for a remote worker the
encrypted :mod:`appliance.jobs.tunnel`, carry data keys and artefacts.
"""

from __future__ import annotations

import json
import os
import select
import struct
from typing import Any

_LEN = struct.Struct(">II")
MAX_FRAME = 2**31


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(head), len(payload)) + head + payload


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The ``(header, payload)`` that :func:`encode` made; ValueError unless ``data`` is exactly one frame."""
    if len(data) < _LEN.size:
        raise ValueError("truncated frame")
    hlen, plen = _LEN.unpack_from(data)
    if _LEN.size + hlen + plen != len(data):
        raise ValueError("frame length mismatch")
    header = json.loads(data[_LEN.size:_LEN.size + hlen])
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")
    return header, bytes(data[_LEN.size + hlen:])


def write_frame(fd: int, header: dict[str, Any], payload: bytes = b"") -> None:
    """Write one whole frame to a raw fd (blocking)."""
    view = memoryview(encode(header, payload))
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Reads frames from a raw fd, with timeouts, without a buffered file object."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()
        self.eof = False

    def _fill(self, timeout: float | None) -> bool:
        if timeout is not None:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return False
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    def _try_parse(self) -> tuple[dict[str, Any], bytes] | None:
        if len(self._buf) < _LEN.size:
            return None
        hlen, plen = _LEN.unpack_from(self._buf)
        total = _LEN.size + hlen + plen
        if len(self._buf) < total:
            return None
        header = json.loads(bytes(self._buf[_LEN.size:_LEN.size + hlen]))
        payload = bytes(self._buf[_LEN.size + hlen:total])
        del self._buf[:total]
        return header, payload

    def read(self, timeout: float | None = None) -> tuple[dict[str, Any], bytes] | None:
        """The next frame; ``None`` on timeout or end of stream (see :attr:`eof`)."""
        while True:
            frame = self._try_parse()
            if frame is not None:
                return frame
            if self.eof or not self._fill(timeout):
                return None
