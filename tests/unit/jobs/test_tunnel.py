"""The remote workers' tunnel and the gateway: tickets, encryption, one start frame per rank."""

from __future__ import annotations

import base64
import os
import socket
import threading

import pytest

from appliance.jobs import streams, tunnel
from appliance.jobs.executors.gateway import WorkerGateway
from tests.timing import scaled

DATA_KEY = os.urandom(32)
START = {"type": "start", "job_id": "ftjob-1", "datasets": [{"key": base64.b64encode(DATA_KEY).decode()}]}


@pytest.fixture
def gateway():
    gw = WorkerGateway("127.0.0.1:0")
    yield gw
    gw.close()


def _connected(gateway, job_id: str):
    """A one-rank session whose worker has connected and read its start frame."""
    session = gateway.open_session(job_id, ranks=1)
    session.offer_start(START)
    conn = tunnel.connect(gateway.address, job_id=job_id, rank=0, ticket=session.ticket)
    conn.read()
    return session, conn


def _relay(target: tuple[str, int], captured: bytearray, back: bytearray | None = None) -> tuple[str, int]:
    """A TCP relay that records every byte both ways: what an eavesdropper on the network sees.

    With ``back``, the bytes towards the dialling side are recorded there, apart from ``captured``.
    """
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(src, dst, record):
        while chunk := src.recv(65536):
            record.extend(chunk)
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)

    def serve():
        client, _ = listener.accept()
        upstream = socket.create_connection(target)
        threading.Thread(target=pipe, args=(client, upstream, captured), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, captured if back is None else back),
                         daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[:2]


def test_a_rank_with_the_ticket_gets_the_start_frame_encrypted_and_reports_back(gateway):
    session = gateway.open_session("ftjob-1", ranks=1)
    session.offer_start(START, lambda: [b"resume-", b"bytes"])
    captured = bytearray()
    conn = tunnel.connect(_relay(gateway.address, captured), job_id="ftjob-1", rank=0, ticket=session.ticket)
    header, payload = conn.read()
    assert header == {**START, "resume_stream": True} and payload == b""
    resume = streams.Buffer()
    streams.receive(conn.read, resume, kind="resume")  # the checkpoint to resume from follows, streamed
    assert resume == b"resume-bytes"
    conn.write({"type": "event", "message": "hello"})
    assert session.frames.get(timeout=scaled(5))[0]["message"] == "hello"
    session.broadcast({"type": "stop"})
    assert conn.read()[0] == {"type": "stop"}
    conn.write({"type": "chunk"}, b"weights")
    assert session.frames.get(timeout=scaled(5)) == ({"type": "chunk"}, b"weights")
    conn.close()
    # Neither the data key nor the ticket crossed the network in the clear.
    wire_bytes = bytes(captured)
    for secret in (DATA_KEY, session.ticket):
        assert secret not in wire_bytes and base64.b64encode(secret) not in wire_bytes
    assert b"resume-bytes" not in wire_bytes and b"weights" not in wire_bytes


def test_a_wrong_ticket_gets_nothing_and_the_right_one_still_works(gateway):
    session = gateway.open_session("ftjob-1", ranks=1)
    session.offer_start(START)
    impostor = tunnel.connect(gateway.address, job_id="ftjob-1", rank=0, ticket=tunnel.new_ticket())
    assert impostor.read() is None  # the gateway hung up without sending a byte
    for job_id, rank in (("ftjob-other", 0), ("ftjob-1", 1)):  # another job, a rank the launch does not have
        with pytest.raises(tunnel.TunnelError):
            tunnel.connect(gateway.address, job_id=job_id, rank=rank, ticket=session.ticket)
    conn = tunnel.connect(gateway.address, job_id="ftjob-1", rank=0, ticket=session.ticket)
    assert conn.read()[0] == {**START, "resume_stream": False}
    assert session.frames.empty()


def test_a_ticket_presented_twice_for_a_rank_fails_the_job(gateway):
    session = gateway.open_session("ftjob-1", ranks=2)
    session.offer_start(START)
    first = tunnel.connect(gateway.address, job_id="ftjob-1", rank=0, ticket=session.ticket)
    assert first.read()[0]["job_id"] == "ftjob-1"
    with pytest.raises(tunnel.TunnelError):
        tunnel.connect(gateway.address, job_id="ftjob-1", rank=0, ticket=session.ticket)
    header, _ = session.frames.get(timeout=scaled(5))
    assert header["type"] == "error" and header["code"] == "worker_auth_failed"


def test_every_rank_gets_the_start_frame_once_then_the_keys_are_dropped(gateway):
    session = gateway.open_session("ftjob-1", ranks=2)
    ranks = [tunnel.connect(gateway.address, job_id="ftjob-1", rank=r, ticket=session.ticket) for r in (0, 1)]
    session.offer_start(START)
    assert [c.read()[0] for c in ranks] == [{**START, "resume_stream": False}] * 2
    assert session.all_connected() and session._start is None  # noqa: SLF001 - the keys are gone
    # Every rank says once where its worker runs; the gateway stamps the rank it authenticated.
    ranks[1].write({"type": "event", "event_type": "isolation", "message": "rank 1 placed",
                    "data": {"rank": 0, "level": "sandbox", "network": "shared"}})
    placed = session.frames.get(timeout=scaled(5))[0]
    assert placed["event_type"] == "isolation" and placed["data"] == {"rank": 1, "level": "sandbox",
                                                                      "network": "shared"}
    ranks[1].write({"type": "event", "event_type": "isolation", "message": "again"})  # once only
    ranks[1].write({"type": "event", "message": "rank 1 is quiet"})  # only rank 0 reports...
    ranks[1].write({"type": "error", "code": "worker_error", "message": "boom"})  # ...but any rank may fail
    assert session.frames.get(timeout=scaled(5))[0]["code"] == "worker_error"
    gateway.close_session(session)
    assert ranks[0].read() is None  # closing the session hangs up on its ranks


def test_a_tampered_frame_ends_the_tunnel(gateway):
    session, conn = _connected(gateway, "ftjob-1")
    sealed = conn._seal.encrypt(conn._sent.to_bytes(12, "big"), b"x" * 40, None)  # noqa: SLF001
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    conn.sock.sendall(len(flipped).to_bytes(4, "big") + flipped)
    assert conn.read() is None  # the gateway dropped the connection
    assert session.frames.empty()


def test_a_long_chunk_stream_crosses_in_order_and_a_replayed_or_dropped_chunk_ends_the_tunnel(gateway):
    """Each chunk is its own sealed frame under the per-direction counter: a big artefact is many frames, and
    replaying or dropping one of them mid-stream breaks authentication, not the artefact silently."""
    session, conn = _connected(gateway, "ftjob-1")
    data = os.urandom(300 * 1024)
    sealed: list[bytes] = []
    real_sock = conn.sock

    class Recorder:
        def sendall(self, frame: bytes) -> None:
            sealed.append(frame)
            real_sock.sendall(frame)

        def __getattr__(self, name):
            return getattr(real_sock, name)

    conn.sock = Recorder()
    threading.Thread(target=streams.send, args=(conn.write, {"kind": "checkpoint", "step": 1}, data),
                     kwargs={"chunk_bytes": 1024}, daemon=True).start()
    out = streams.Buffer()
    incoming = streams.receive(lambda: session.frames.get(timeout=scaled(5)), out, kind="checkpoint")
    assert out == data and incoming.received == len(data) and len(sealed) == 302  # begin, 300 chunks, end
    real_sock.sendall(sealed[150])  # a chunk frame replayed: its counter is long past
    assert conn.read() is None and session.frames.empty()

    session = gateway.open_session("ftjob-2", ranks=1)
    session.offer_start({**START, "job_id": "ftjob-2"})
    conn = tunnel.connect(gateway.address, job_id="ftjob-2", rank=0, ticket=session.ticket)
    conn.read()
    conn.write({"type": "chunk"}, b"first")
    conn._sent += 1  # noqa: SLF001 - a frame dropped on the way: the next one is sealed under the wrong counter
    conn.write({"type": "chunk"}, b"third")
    assert session.frames.get(timeout=scaled(5)) == ({"type": "chunk"}, b"first")
    assert conn.read() is None and session.frames.empty()


def test_a_sealed_frame_announced_over_the_bound_ends_the_tunnel_before_buffering(gateway):
    session, conn = _connected(gateway, "ftjob-1")
    conn.sock.sendall((tunnel.MAX_SEALED + 1).to_bytes(4, "big"))
    assert conn.read() is None and session.frames.empty()


def test_a_rank_streaming_faster_than_the_scheduler_reads_is_held_back_not_buffered(gateway):
    """The session's queue is bounded: the pump stops reading and TCP pushes back on the worker."""
    from appliance.jobs.executors.gateway import QUEUED_FRAMES

    session, conn = _connected(gateway, "ftjob-1")
    chunk = os.urandom(streams.CHUNK_BYTES)
    sent = threading.Event()

    def flood():
        for i in range(64):
            conn.write({"type": "chunk", "i": i}, chunk)
        sent.set()

    threading.Thread(target=flood, daemon=True).start()
    assert not sent.wait(scaled(1.5))  # 64 MiB cannot all be in flight: the writer is held back
    assert session.frames.qsize() == QUEUED_FRAMES
    received = [session.frames.get(timeout=scaled(5))[0]["i"] for _ in range(64)]
    assert received == list(range(64)) and sent.wait(scaled(5))


def _frames(data: bytes) -> list[bytes]:
    """Split a recorded direction into its length-prefixed frames (plain or sealed)."""
    out, i = [], 0
    while i + 4 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        out.append(data[i + 4:i + 4 + size])
        i += 4 + size
    return out


def test_a_recording_and_the_ticket_learnt_later_do_not_open_the_start_frame(gateway, monkeypatch):
    """Forward secrecy: the session keys come from an ephemeral X25519 exchange, not from the ticket alone."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.hashes import SHA256
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from appliance.jobs import wire

    ephemeral = []  # the worker's and the control plane's ephemeral keys, kept here to check the test itself
    real_generate = X25519PrivateKey.generate
    monkeypatch.setattr(tunnel.X25519PrivateKey, "generate",
                        staticmethod(lambda: ephemeral.append(real_generate()) or ephemeral[-1]))
    w2c, c2w = bytearray(), bytearray()  # each direction recorded apart
    session = gateway.open_session("ftjob-fs", ranks=1)
    session.offer_start(START)
    ticket = session.ticket
    conn = tunnel.connect(_relay(gateway.address, w2c, c2w), job_id="ftjob-fs", rank=0, ticket=ticket)
    assert conn.read()[0]["datasets"] == START["datasets"]
    conn.close()
    gateway.close_session(session)

    hello, _ = wire.decode(_frames(bytes(w2c))[0])
    challenge, _ = wire.decode(_frames(bytes(c2w))[0])
    sealed_start = _frames(bytes(c2w))[1]
    nonce_w, nonce_c = base64.b64decode(hello["nonce"]), base64.b64decode(challenge["nonce"])
    share_w, share_c = base64.b64decode(hello["share"]), base64.b64decode(challenge["share"])

    def opens(ikm: bytes, salt: bytes, info: bytes) -> bool:
        key = HKDF(algorithm=SHA256(), length=64, salt=salt, info=info).derive(ikm)[32:]
        try:
            AESGCM(key).decrypt((0).to_bytes(12, "big"), sealed_start, None)
            return True
        except InvalidTag:
            return False

    transcript = nonce_w + nonce_c + share_w + share_c
    info = b"appliance-tunnel/2|ftjob-fs|0"
    # The eavesdropper has every public value and, later, the ticket: nothing it can compute opens it,
    # neither the old ticket-only derivation nor a Diffie-Hellman with a key of its own.
    assert not opens(ticket, nonce_w + nonce_c, b"appliance-tunnel/1|ftjob-fs|0")
    assert not opens(ticket, transcript, info)
    stranger = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(share_c))
    assert not opens(stranger + ticket, transcript, info)
    # Only with an ephemeral private key (gone with the connection) does it open: the test reads it right.
    worker_secret = next(k for k in ephemeral if k.public_key().public_bytes_raw() == share_w)
    assert opens(worker_secret.exchange(X25519PublicKey.from_public_bytes(share_c)) + ticket, transcript, info)


def test_a_low_order_key_share_is_refused(gateway):
    session = gateway.open_session("ftjob-low", ranks=1)
    session.offer_start(START)
    sock = socket.create_connection(gateway.address)
    tunnel._write_plain(sock, {"type": "hello", "job_id": "ftjob-low", "rank": 0,  # noqa: SLF001
                               "nonce": base64.b64encode(os.urandom(16)).decode(),
                               "share": base64.b64encode(bytes(32)).decode()})
    sock.settimeout(scaled(5))
    try:
        data = b""  # the gateway hangs up without a word
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    assert data == b""
    assert session.frames.empty()


def test_a_ray_ticket_is_derived_from_the_node_key_and_a_public_nonce():
    """The Ray job carries the nonce; without the node key it yields nothing that opens a tunnel."""
    key, nonce = os.urandom(32), tunnel.new_nonce()
    ticket = tunnel.derive_ticket(key, nonce, "ftjob-1")
    assert len(ticket) == tunnel.TICKET_BYTES and ticket == tunnel.derive_ticket(key, nonce, "ftjob-1")
    assert ticket not in (nonce, key)
    others = {tunnel.derive_ticket(os.urandom(32), nonce, "ftjob-1"), tunnel.derive_ticket(key, tunnel.new_nonce(),
              "ftjob-1"), tunnel.derive_ticket(key, nonce, "ftjob-2")}
    assert ticket not in others and len(others) == 3
    with pytest.raises(ValueError, match="node_key: 16 bytes"):
        tunnel.derive_ticket(key[:16], nonce, "ftjob-1")


def test_the_node_key_file_must_hold_enough_random_bytes(tmp_path):
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 8)
    with pytest.raises(ValueError, match=r"APPLIANCE_RAY_NODE_KEY_FILE=.*short.key.*holds 8 bytes.*head -c 32"):
        tunnel.read_node_key(short)
    good = tmp_path / "node.key"
    good.write_bytes(b"k" * 32)
    assert tunnel.read_node_key(good) == b"k" * 32
