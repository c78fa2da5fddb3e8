"""Artefacts of any size as a stream of bounded frames, between a worker and the control plane.

A checkpoint, an adapter file, a result image (worker to control plane) or
the checkpoint a job resumes from (control plane to worker) travels as::

    {"type": "begin", "kind": KIND, "size": N | null, ...}   the artefact's own fields (step, name)
    {"type": "chunk"} + payload                              CHUNK_BYTES at most, as many as needed
    {"type": "end", "size": N, "sha256": HEX}                what the sender sent, checked by the receiver

Sizes are plain JSON integers, so an artefact may be any size (over 4 GiB
included); every frame stays small, so neither end holds more than a chunk
of it (the tunnel seals frame by frame). Other frames (events, stop) may
come between the chunks; only one artefact is open at a time on one link.
The receiver hands each chunk to its sink as it arrives (the control plane's
is an encrypted blob writer) and checks the size and SHA-256 at the end; a
stream that overruns its declared size, ends short, or whose digest differs
raises :class:`StreamError`, and its sink is aborted so nothing half-written
remains.

Worker side and control-plane side alike: this module imports neither.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Protocol

from appliance.jobs.wire import MAX_PAYLOAD

#: Payload bytes per chunk frame.
CHUNK_BYTES = 1 << 20

Frame = tuple[dict[str, Any], bytes]
#: What can be sent: bytes (sliced, never copied), a file path or binary file (read chunk by chunk),
#: or an iterable of byte chunks (e.g. a blob being decrypted segment by segment).
Source = bytes | bytearray | memoryview | os.PathLike | BinaryIO | Iterable[bytes]
#: Opens a fresh iterable of an artefact's chunks, once per receiver (a blob decrypted as it is read).
Opener = Callable[[], Iterable[bytes]]


class StreamError(Exception):
    """An artefact stream broke its framing: out of order, oversized, truncated or corrupted in transit."""


class Sink(Protocol):
    def write(self, data: bytes) -> Any: ...


class Buffer(bytearray):
    """A sink that keeps the artefact in memory (a worker's resume checkpoint: the trainer wants bytes)."""

    def write(self, data: bytes) -> None:
        self.extend(data)


def chunks(source: Source, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
    """``source`` in chunks of at most ``chunk_bytes`` (small pieces of an iterable are coalesced)."""
    if isinstance(source, str):
        raise TypeError("a stream source must be bytes, a path object, a binary file or chunks; got a str")
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        for start in range(0, len(view), chunk_bytes):
            yield view[start:start + chunk_bytes]
        return
    if isinstance(source, os.PathLike):
        with open(source, "rb") as fh:
            yield from chunks(fh, chunk_bytes)
        return
    if hasattr(source, "read"):
        while block := source.read(chunk_bytes):
            yield block
        return
    pending = bytearray()
    for piece in source:
        pending += piece
        while len(pending) >= chunk_bytes:
            yield bytes(pending[:chunk_bytes])
            del pending[:chunk_bytes]
    if pending:
        yield bytes(pending)


def source_size(source: Source) -> int | None:
    """The size of ``source`` if it can be told before sending it (bytes, a path, a regular file)."""
    if isinstance(source, (bytes, bytearray)):
        return len(source)
    if isinstance(source, memoryview):
        return source.nbytes
    if isinstance(source, os.PathLike):
        return os.stat(source).st_size
    if hasattr(source, "fileno") and hasattr(source, "tell"):
        try:
            return os.fstat(source.fileno()).st_size - source.tell()
        except (OSError, ValueError):
            return None
    return None


def send(write: Callable[[dict[str, Any], bytes | memoryview], None], header: dict[str, Any], source: Source,
         *, size: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Send ``source`` as one artefact: a begin frame (``header`` plus its size), chunks, an end frame.

    Args:
        write: Writes one frame (``(header, payload)``).
        header: The begin frame's fields; ``kind`` names the artefact (``checkpoint``, ``artifact``, ...).
        source: The bytes, a path or binary file (read ``chunk_bytes`` at a time), or an iterable of chunks.
        size: The size to declare when ``source`` cannot tell it (an iterable); the receiver holds the sender to it.
        chunk_bytes: Payload bytes per chunk frame.

    Returns:
        The number of bytes sent.
    """
    writer = Writer(write, header, size=source_size(source) if size is None else size, chunk_bytes=chunk_bytes)
    for chunk in chunks(source, chunk_bytes):
        writer.write(chunk)
    return writer.close()


class Writer:
    """One artefact sent as it is written: a binary file whose bytes leave in chunk frames.

    What produces an artefact by writing to a file (``torch.save``, a zip writer) writes
    into this instead, so the artefact is never whole in the sender's memory: at most one
    chunk is held. :meth:`close` sends the rest and the end frame; a writer left unclosed
    (its producer failed) sends no end, and the receiver discards the stream when the
    sender's error frame arrives.

    Args:
        write: Writes one frame (``(header, payload)``).
        header: The begin frame's fields; ``kind`` names the artefact.
        size: The size, when known before writing (the receiver holds the sender to it).
        chunk_bytes: Payload bytes per chunk frame.
    """

    def __init__(self, write: Callable[[dict[str, Any], bytes | memoryview], None], header: dict[str, Any], *,
                 size: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        if not 0 < chunk_bytes <= MAX_PAYLOAD:
            raise ValueError(f"`chunk_bytes` must be in 1..{MAX_PAYLOAD}; got {chunk_bytes}")
        if "kind" not in header:
            raise ValueError(f"a stream's begin header needs a `kind`; got {sorted(header)}")
        self._write, self._chunk_bytes = write, chunk_bytes
        self._pending = bytearray()
        self._digest = hashlib.sha256()
        self.sent = 0
        self.closed = False
        write({**header, "type": "begin", "size": size}, b"")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            raise ValueError("write to a closed artefact stream")
        view = memoryview(data).cast("B")
        n = len(view)
        if self._pending:  # top the pending chunk up first
            room = self._chunk_bytes - len(self._pending)
            self._pending += view[:room]
            view = view[room:]
            if len(self._pending) < self._chunk_bytes:
                return n
            self._send(self._pending)
            self._pending = bytearray()
        # Whole chunks straight from the caller's buffer when it is immutable (the link may queue them);
        # copied when the caller may reuse it.
        immutable = isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly)
        while len(view) >= self._chunk_bytes:
            piece = view[:self._chunk_bytes]
            self._send(piece if immutable else bytes(piece))
            view = view[self._chunk_bytes:]
        self._pending += view
        return n

    def flush(self) -> None:
        """Nothing to do: chunks leave when full, the rest at :meth:`close`."""

    def close(self) -> int:
        """Send what is pending and the end frame; the number of bytes sent."""
        if not self.closed:
            if self._pending:
                self._send(self._pending)
                self._pending = bytearray()
            self._write({"type": "end", "size": self.sent, "sha256": self._digest.hexdigest()}, b"")
            self.closed = True
        return self.sent

    def _send(self, chunk: bytes | bytearray | memoryview) -> None:
        self._digest.update(chunk)
        self.sent += len(chunk)
        self._write({"type": "chunk"}, chunk)  # a pending bytearray is replaced, never reused, once sent


class Incoming:
    """One artefact being received: its begin header, and the size and digest of what has arrived.

    Args:
        begin: The begin frame's header.
        sink: Receives each chunk as it arrives; aborted (``abort()``, if it has one) when the stream fails.
    """

    def __init__(self, begin: dict[str, Any], sink: Sink) -> None:
        self.begin, self.sink = begin, sink
        self.kind = str(begin.get("kind"))
        declared = begin.get("size")
        if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool) or declared < 0):
            raise StreamError(f"{self.kind} stream declared a size of {declared!r}; expected bytes (an integer >= 0)")
        self.declared: int | None = declared
        self.received = 0
        self._digest = hashlib.sha256()

    def write(self, payload: bytes) -> None:
        if self.declared is not None and self.received + len(payload) > self.declared:
            raise StreamError(f"{self.kind} stream overran its declared size: {self.received + len(payload)} "
                              f"bytes of {self.declared}")
        self._digest.update(payload)
        self.sink.write(payload)
        self.received += len(payload)

    def check_end(self, end: dict[str, Any]) -> None:
        """Raise :class:`StreamError` unless the end frame matches what arrived."""
        size = end.get("size")
        expected = self.declared if self.declared is not None else size
        if size != self.received or expected != self.received:
            raise StreamError(f"{self.kind} stream is truncated or inconsistent: received {self.received} bytes, "
                              f"declared {self.declared}, the sender counted {size!r}")
        if end.get("sha256") != self.sha256:
            raise StreamError(f"{self.kind} stream is corrupted: the SHA-256 of the {self.received} bytes received "
                              f"does not match the sender's")

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def abort(self) -> None:
        _abort(self.sink)


class Receiver:
    """The receiving end of one link: at most one artefact open at a time.

    Feed it every ``begin``/``chunk``/``end`` frame in order; :meth:`end` returns
    the verified artefact. On any :class:`StreamError` the open artefact's sink
    has already been aborted.
    """

    def __init__(self) -> None:
        self.current: Incoming | None = None

    def begin(self, header: dict[str, Any], sink: Sink) -> Incoming:
        if self.current is not None:
            self.abandon()
            _abort(sink)
            raise StreamError(f"a {header.get('kind')} stream began while another stream was open")
        try:
            self.current = Incoming(header, sink)
        except StreamError:
            _abort(sink)
            raise
        return self.current

    def chunk(self, payload: bytes) -> None:
        if self.current is None:
            raise StreamError("a chunk arrived outside any stream")
        try:
            self.current.write(payload)
        except StreamError:
            self.abandon()
            raise

    def end(self, header: dict[str, Any]) -> Incoming:
        if self.current is None:
            raise StreamError("a stream end arrived outside any stream")
        incoming, self.current = self.current, None
        try:
            incoming.check_end(header)
        except StreamError:
            incoming.abort()
            raise
        return incoming

    def abandon(self) -> Incoming | None:
        """Abort the open artefact, if any (the link ended or failed mid-stream); it is returned."""
        incoming, self.current = self.current, None
        if incoming is not None:
            incoming.abort()
        return incoming


def _abort(sink: Sink) -> None:
    abort = getattr(sink, "abort", None)
    if abort is not None:
        abort()


def receive(read: Callable[[], Frame | None], sink: Sink, *, kind: str,
            on_other: Callable[[Frame], None] | None = None) -> Incoming:
    """Read one whole artefact of ``kind`` from ``read`` into ``sink`` (a worker reading its resume checkpoint).

    Frames other than the stream's go to ``on_other`` (a ``stop`` may arrive meanwhile).

    Raises:
        StreamError: The link ended mid-stream, another artefact came, or the stream does not check out.
    """
    receiver = Receiver()
    while True:
        frame = read()
        if frame is None:
            receiver.abandon()
            raise StreamError(f"the link closed before the {kind} stream ended")
        header, payload = frame
        kind_of_frame = header.get("type")
        if kind_of_frame == "begin":
            if header.get("kind") != kind:
                raise StreamError(f"expected a {kind} stream; a {header.get('kind')} stream began")
            receiver.begin(header, sink)
        elif kind_of_frame == "chunk":
            receiver.chunk(payload)
        elif kind_of_frame == "end":
            return receiver.end(header)
        elif on_other is not None:
            on_other(frame)
