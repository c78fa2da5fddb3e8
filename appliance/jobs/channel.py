"""The worker's link to the scheduler: frames over the sandbox's pipes, or over a Ray rank's tunnel."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from appliance.jobs import streams
from appliance.jobs.tunnel import TunnelError
from appliance.jobs.wire import FrameError, FrameReader, write_frame


class PipeTransport:
    """Frames over the two pipes the sandbox hands a local worker."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.reader = FrameReader(in_fd)
        self.out_fd = out_fd

    def read(self) -> tuple[dict[str, Any], bytes] | None:
        return self.reader.read()

    def write(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        write_frame(self.out_fd, header, payload)


class Channel:
    """The worker's side of its link to the scheduler (pipes, or a tunnel for a Ray rank).

    Args:
        transport: Anything with ``read() -> frame | None`` and ``write(header, payload)``.
        primary: Whether this worker reports; a non-primary data-parallel rank
            sends only its errors (rank 0 reports for all).
    """

    def __init__(self, transport: Any, *, primary: bool = True) -> None:
        self.transport = transport
        self.primary = primary
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._stream_lock = threading.Lock()

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        if not self.primary and header.get("type") != "error":
            return
        with self._lock:
            try:
                self.transport.write(header, payload)
            except OSError:
                os._exit(3)  # the scheduler is gone: nobody to report to

    def send_artefact(self, header: dict[str, Any], source: streams.Source) -> None:
        """Send a checkpoint, adapter file or result file of any size as a stream of chunks.

        Args:
            header: The artefact's fields, ``kind`` first (``checkpoint``, ``artifact``, ``result_file``).
            source: Its bytes (sent slice by slice, not copied), or a path or binary file read chunk by chunk.
        """
        if not self.primary:
            return
        with self._stream_lock:  # one artefact at a time; events may still pass between its chunks
            streams.send(self.send, header, source)

    @contextlib.contextmanager
    def artefact_writer(self, header: dict[str, Any]) -> Iterator[streams.Writer | _Discard]:
        """A binary file whose bytes are sent as one artefact as they are written (a checkpoint being saved).

        The stream ends when the block does; if the block raises, no end is sent (the error that
        follows makes the scheduler discard what arrived). A non-primary rank's bytes go nowhere.
        """
        if not self.primary:
            yield _Discard()
            return
        with self._stream_lock:
            writer = streams.Writer(self.send, header)
            yield writer
            writer.close()

    def receive_resume(self) -> bytes:
        """Read the checkpoint the scheduler streams after the start frame (before :meth:`watch_control` runs)."""
        buffer = streams.Buffer()

        def on_other(frame: tuple[dict[str, Any], bytes]) -> None:
            if frame[0].get("type") == "stop":
                self.stop.set()

        streams.receive(self.transport.read, buffer, kind="resume", on_other=on_other)
        return bytes(buffer)

    def event(self, message: str, *, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        self.send({"type": "event", "level": level, "event_type": type, "message": message, "data": data})

    def watch_control(self) -> None:
        """Background: set :attr:`stop` on a stop message; exit if the scheduler died."""
        while True:
            try:
                frame = self.transport.read()
            except (OSError, TunnelError, FrameError):
                frame = None
            if frame is None:
                os._exit(3)  # link closed: the server was killed; die with it
            if frame[0].get("type") == "stop":
                self.stop.set()


class _Discard:
    """Where a non-primary rank's artefacts go: nowhere."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass
