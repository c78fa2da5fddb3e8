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


def test_a_writer_sends_what_is_written_in_bounded_chunks_whatever_the_write_sizes():
    data = os.urandom(3 * streams.CHUNK_BYTES + 77)
    sent: list[tuple[dict, bytes]] = []
    writer = streams.Writer(lambda h, p: sent.append((h, bytes(p))), {"kind": "checkpoint", "step": 3})
    cuts = [0, 5, 5 + streams.CHUNK_BYTES - 1, 2 * streams.CHUNK_BYTES + 9, len(data)]  # small, odd and large writes
    for a, b in zip(cuts, cuts[1:], strict=False):
        assert writer.write(bytearray(data[a:b])) == b - a
    assert writer.close() == len(data) and writer.close() == len(data)  # closing twice sends one end
    assert sent[0][0] == {"kind": "checkpoint", "step": 3, "type": "begin", "size": None}
    assert all(0 < len(p) <= streams.CHUNK_BYTES for _, p in sent[1:-1])
    assert [h["type"] for h, _ in sent].count("end") == 1
    out = streams.Buffer()
    streams.receive(iter(sent).__next__, out, kind="checkpoint")
    assert out == data
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"x")


def test_a_writer_copies_chunks_of_a_buffer_the_caller_may_reuse():
    kept: list = []
    writer = streams.Writer(lambda h, p: kept.append(p), {"kind": "artifact"}, chunk_bytes=4)
    buffer = bytearray(b"abcdefgh")
    writer.write(buffer)
    buffer[:] = b"XXXXXXXX"  # a producer reusing its buffer must not change what was queued to send
    writer.close()
    assert b"".join(bytes(p) for p in kept[1:-1]) == b"abcdefgh"


def test_a_checkpoint_serialised_into_a_writer_is_never_whole_in_memory():
    """torch.save into the stream: the sender holds a chunk, not the checkpoint (BytesIO holds it twice)."""
    import tracemalloc

    import torch

    from appliance.trainkit.checkpoint import CheckpointFormat

    fmt = CheckpointFormat("test.checkpoint/1", "test checkpoint")
    state = {f"w{i}": torch.randn(2 << 20) for i in range(4)}  # 4 x 8 MiB of tensors
    digest, sizes = hashlib.sha256(), []

    def write(header, payload):
        if header["type"] == "chunk":
            sizes.append(len(payload))
            digest.update(payload)

    tracemalloc.start()
    try:
        writer = streams.Writer(write, {"kind": "checkpoint"})
        fmt.dump_to(state, writer)
        writer.close()
        streamed_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = fmt.dump(state)
        whole_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(sizes) == len(whole) > 32 << 20 and digest.hexdigest() == hashlib.sha256(whole).hexdigest()
    assert max(sizes) <= streams.CHUNK_BYTES
    assert streamed_peak < 3 * streams.CHUNK_BYTES < 32 << 20 < whole_peak
    assert fmt.load(whole)["w3"].equal(state["w3"])


def test_a_trainer_takes_its_checkpoints_as_bytes_or_as_a_stream_never_both():
    from appliance.trainkit.checkpoint import CheckpointFormat

    fmt = CheckpointFormat("test.checkpoint/1", "test checkpoint")
    got: dict = {}
    fmt.saver(got.__setitem__, None)(4, {"step": 4})
    assert fmt.load(got[4])["step"] == 4
    buffers: dict = {}

    def open_checkpoint(step):
        import contextlib

        buffers[step] = io.BytesIO()
        return contextlib.nullcontext(buffers[step])

    fmt.saver(None, open_checkpoint)(6, {"step": 6})
    assert fmt.load(buffers[6].getvalue())["step"] == 6
    assert fmt.saver(None, None) is None
    with pytest.raises(ValueError, match="not both"):
        fmt.saver(got.__setitem__, open_checkpoint)
