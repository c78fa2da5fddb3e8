"""Artefact streams: begin/chunk/end framing, size and digest accounting (over 4 GiB too), aborts on any fault."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from appliance.jobs import streams, wire

FIVE_GIB = 5 << 30


class CountingSink:
    """A sink that keeps only a count, a digest and whether it was aborted."""

    def __init__(self) -> None:
        self.bytes, self.aborted = 0, False
        self.digest = hashlib.sha256()

    def write(self, data) -> None:
        self.bytes += len(data)
        self.digest.update(data)

    def abort(self) -> None:
        self.aborted = True


class Zeros(io.RawIOBase):
    """A readable file of ``size`` zero bytes that never holds more than one chunk."""

    def __init__(self, size: int) -> None:
        self.left = size
        self._block = bytes(streams.CHUNK_BYTES)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.left, len(self._block))
        self.left -= n
        return self._block if n == len(self._block) else self._block[:n]


def _frames(header: dict, source, **kw) -> list[tuple[dict, bytes]]:
    sent: list[tuple[dict, bytes]] = []
    streams.send(lambda h, p: sent.append((h, bytes(p))), header, source, **kw)
    return sent


def test_bytes_go_out_as_bounded_chunks_and_come_back_whole():
    data = os.urandom(2 * streams.CHUNK_BYTES + 123)
    frames = _frames({"kind": "checkpoint", "step": 7}, data)
    assert frames[0][0] == {"kind": "checkpoint", "step": 7, "type": "begin", "size": len(data)}
    assert [len(p) for _, p in frames[1:-1]] == [streams.CHUNK_BYTES, streams.CHUNK_BYTES, 123]
    assert frames[-1][0] == {"type": "end", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    out = streams.Buffer()
    incoming = streams.receive(iter(frames).__next__, out, kind="checkpoint")
    assert out == data and incoming.begin["step"] == 7 and incoming.received == len(data)


def test_a_file_is_read_from_disk_chunk_by_chunk_with_its_size_declared(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(os.urandom(300_000))
    frames = _frames({"kind": "artifact", "name": "a"}, path, chunk_bytes=100_000)
    assert frames[0][0]["size"] == 300_000 and len(frames) == 5
    frames = _frames({"kind": "artifact", "name": "a"}, iter([b"ab"] * 5), chunk_bytes=4)  # chunks coalesced
    assert frames[0][0]["size"] is None and [p for _, p in frames[1:-1]] == [b"abab", b"abab", b"ab"]


def test_declared_sizes_over_4_gib_cross_the_wire_and_are_accounted_without_the_data(tmp_path):
    """A 5 GiB checkpoint's begin and end frames through a real pipe, a few chunks of it, and the accounting."""
    r, w = os.pipe()
    digest = hashlib.sha256(b"\0" * 3 * streams.CHUNK_BYTES).hexdigest()
    frames = [({"type": "begin", "kind": "checkpoint", "step": 1, "size": FIVE_GIB}, b""),
              *[({"type": "chunk"}, bytes(streams.CHUNK_BYTES))] * 3,
              ({"type": "end", "size": FIVE_GIB, "sha256": digest}, b"")]

    def write():
        for header, payload in frames:
            wire.write_frame(w, header, payload)
        os.close(w)

    threading.Thread(target=write, daemon=True).start()
    reader, receiver, sink = wire.FrameReader(r), streams.Receiver(), CountingSink()
    begin, _ = reader.read(timeout=5)
    incoming = receiver.begin(begin, sink)
    assert incoming.declared == FIVE_GIB
    for _ in range(3):
        receiver.chunk(reader.read(timeout=5)[1])
    end, _ = reader.read(timeout=5)
    assert end["size"] == FIVE_GIB and incoming.received == 3 * streams.CHUNK_BYTES
    with pytest.raises(streams.StreamError, match=rf"truncated.*received {3 * streams.CHUNK_BYTES} bytes, "
                                                  rf"declared {FIVE_GIB}"):
        receiver.end(end)
    assert sink.aborted and receiver.current is None
    os.close(r)
    # Past 4 GiB the count is exact: no 32-bit wrap-around in the overrun check either.
    incoming = streams.Incoming({"kind": "checkpoint", "size": 2**32 + 1}, CountingSink())
    incoming.received = 2**32
    incoming.write(b"x")
    with pytest.raises(streams.StreamError, match="overran its declared size: 4294967298 bytes of 4294967297"):
        incoming.write(b"y")


@pytest.mark.parametrize("fault", ["digest", "overrun", "short", "reordered", "orphan chunk", "second begin",
                                   "bad size"])
def test_a_broken_stream_is_a_clear_error_and_its_sink_is_aborted(fault):
    data = os.urandom(3000)
    frames = _frames({"kind": "checkpoint", "step": 1}, data, chunk_bytes=1000)
    begin, c1, c2, c3, end = frames
    match = {"digest": "corrupted: the SHA-256", "overrun": "overran its declared size",
             "short": "truncated", "reordered": "corrupted", "orphan chunk": "outside any stream",
             "second begin": "began while another stream was open", "bad size": "declared a size of -1"}[fault]
    sequence = {
        "digest": [begin, c1, ({"type": "chunk"}, bytes([c2[1][0] ^ 1]) + c2[1][1:]), c3, end],
        "overrun": [begin, c1, c2, c3, c3, end],
        "short": [begin, c1, c2, end],
        "reordered": [begin, c1, c3, c2, end],
        "orphan chunk": [c1],
        "second begin": [begin, c1, begin],
        "bad size": [({**begin[0], "size": -1}, b"")],
    }[fault]
    receiver, sinks = streams.Receiver(), []
    with pytest.raises(streams.StreamError, match=match):
        for header, payload in sequence:
            if header["type"] == "begin":
                sinks.append(CountingSink())
                receiver.begin(header, sinks[-1])
            elif header["type"] == "chunk":
                receiver.chunk(payload)
            else:
                receiver.end(header)
    assert all(s.aborted for s in sinks) and receiver.current is None


def test_a_link_that_closes_mid_stream_is_a_stream_error():
    frames = _frames({"kind": "resume"}, b"x" * 10, chunk_bytes=4)[:-1]
    feed = iter([*frames, None])
    with pytest.raises(streams.StreamError, match="closed before the resume stream ended"):
        streams.receive(feed.__next__, streams.Buffer(), kind="resume")


def test_other_frames_may_pass_between_chunks():
    frames = _frames({"kind": "resume"}, b"x" * 10, chunk_bytes=4)
    frames.insert(2, ({"type": "stop"}, b""))
    others = []
    out = streams.Buffer()
    streams.receive(iter(frames).__next__, out, kind="resume", on_other=others.append)
    assert out == b"x" * 10 and others == [({"type": "stop"}, b"")]


@pytest.mark.slow
def test_a_5_gib_artefact_streams_through_a_real_pipe(tmp_path):
    """Over 4 GiB end to end: generated on one side (never whole), counted and hashed on the other."""
    size = FIVE_GIB + 12345
    r, w = os.pipe()

    def send():
        streams.send(lambda h, p: wire.write_frame(w, h, p), {"kind": "checkpoint", "step": 1}, Zeros(size),
                     size=size)
        os.close(w)

    threading.Thread(target=send, daemon=True).start()
    reader, receiver, sink = wire.FrameReader(r), streams.Receiver(), CountingSink()
    started = time.monotonic()
    while (frame := reader.read(timeout=60)) is not None:
        header, payload = frame
        if header["type"] == "begin":
            receiver.begin(header, sink)
        elif header["type"] == "chunk":
            receiver.chunk(payload)
        else:
            incoming = receiver.end(header)
            break
    os.close(r)
    assert incoming.declared == incoming.received == sink.bytes == size and not sink.aborted
    print(f"5 GiB streamed in {time.monotonic() - started:.1f}s")
