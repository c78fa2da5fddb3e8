"""The frame format: 64-bit lengths, bounded frames, clear errors on absurd sizes, no allocation of a declared size."""

from __future__ import annotations

import os
import threading
import tracemalloc

import pytest

from appliance.jobs import wire

FIVE_GIB = 5 << 30


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_frame_round_trips_with_a_64_bit_payload_length():
    data = wire.encode({"type": "chunk"}, b"abc")
    hlen, plen = wire.PREFIX.unpack_from(data)
    assert wire.PREFIX.size == 12 and (hlen, plen) == (len(b'{"type":"chunk"}'), 3)
    assert wire.decode(data) == ({"type": "chunk"}, b"abc")
    # A length over 4 GiB is representable (the old ">II" prefix raised struct.error here).
    prefix = wire.PREFIX.pack(2, FIVE_GIB)
    assert wire.PREFIX.unpack(prefix) == (2, FIVE_GIB)


def test_the_reader_refuses_a_5_gib_frame_from_its_prefix_without_allocating_it(pipe):
    r, w = pipe
    head = b'{"type":"chunk"}'
    os.write(w, wire.PREFIX.pack(len(head), FIVE_GIB) + head + b"\0" * 4096)  # the start of a 5 GiB payload
    reader = wire.FrameReader(r)
    tracemalloc.start()
    try:
        with pytest.raises(wire.FrameError, match=rf"payload of {FIVE_GIB} bytes declared; the limit is "
                                                  rf"{wire.MAX_PAYLOAD}.*stream of chunks"):
            reader.read(timeout=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # it read the prefix and a little more, never toward the declared size


@pytest.mark.parametrize(("hlen", "plen", "match"), [
    (2**32 - 1, 0, "frame header of 4294967295 bytes declared; the limit is 1048576"),
    (wire.MAX_HEADER + 1, 0, "frame header of"),
    (2, 2**64 - 1, "frame payload of 18446744073709551615 bytes"),
    (2, wire.MAX_PAYLOAD + 1, "frame payload of"),
])
def test_absurd_declared_lengths_are_clear_errors(pipe, hlen, plen, match):
    r, w = pipe
    os.write(w, wire.PREFIX.pack(hlen, plen))
    with pytest.raises(wire.FrameError, match=match):
        wire.FrameReader(r).read(timeout=5)
    with pytest.raises(wire.FrameError, match=match):
        wire.decode(wire.PREFIX.pack(hlen, plen))


def test_a_writer_refuses_a_payload_over_the_frame_limit_without_touching_it():
    with pytest.raises(wire.FrameError, match="must be sent as a stream of chunks"):
        wire.encode_prefix({"type": "checkpoint"}, FIVE_GIB)


def test_frames_split_anywhere_and_back_to_back_parse_and_a_bad_header_is_a_frame_error(pipe):
    r, w = pipe
    frames = [({"type": "event", "n": i}, os.urandom(i * 1000)) for i in range(20)]
    data = b"".join(wire.encode(h, p) for h, p in frames)

    def dribble():
        for i in range(0, len(data), 777):
            os.write(w, data[i:i + 777])
        os.write(w, wire.PREFIX.pack(3, 0) + b"[1]")  # JSON, but not an object
        os.close(w)

    threading.Thread(target=dribble, daemon=True).start()
    reader = wire.FrameReader(r)
    assert [reader.read(timeout=5) for _ in frames] == frames
    with pytest.raises(wire.FrameError, match="not an object"):
        reader.read(timeout=5)


def test_write_frame_sends_a_memoryview_payload_without_copying_it_first(pipe):
    r, w = pipe
    payload = bytearray(os.urandom(50_000))
    threading.Thread(target=wire.write_frame, args=(w, {"type": "chunk"}, memoryview(payload)[10:40_010]),
                     daemon=True).start()
    assert wire.FrameReader(r).read(timeout=5) == ({"type": "chunk"}, bytes(payload[10:40_010]))
