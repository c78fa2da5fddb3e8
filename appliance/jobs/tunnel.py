"""An encrypted, authenticated frame stream between the control plane and a remote worker.

A worker on a Ray node cannot inherit a pipe from the scheduler, so it dials
back over TCP and speaks the same frames (:mod:`appliance.jobs.wire`) through
this tunnel. Both ends hold a per-launch *ticket*: 32 random bytes the
control plane makes for one launch of one job and forgets when that launch
ends. The ticket never crosses the connection. The handshake is an ephemeral
X25519 exchange authenticated by the ticket (the shape of TLS 1.3's PSK-DHE mode):
both ends derive one AES-256-GCM key per direction from the Diffie-Hellman secret
*and* the ticket, so

* only a holder of the ticket completes the handshake (its first sealed frame proves it);
* the session keys die with the connection: whoever records the traffic and later
  learns the ticket (from the Ray job's runtime_env, a log) still cannot decrypt the
  start frame (job spec and data keys), checkpoints or artefacts: forward secrecy;
* a tampered, replayed, reordered or forged frame ends the connection.

Handshake (``W`` worker, ``C`` control plane)::

    W -> C  hello      {"type": "hello", "job_id", "rank", "nonce", "share"}   plain; 16 random bytes, X25519 public key
    C -> W  challenge  {"type": "challenge", "nonce", "share"}                 plain; the same from C
    both    dh = X25519(own ephemeral private key, peer's share)
            k_wc | k_cw = HKDF-SHA256(dh | ticket, salt = nonce_w | nonce_c | share_w | share_c,
                                      info = "appliance-tunnel/2|<job_id>|<rank>")
    W -> C  ready      sealed with k_wc: C checks it before it sends anything secret
    C -> W  start      sealed with k_cw: the job and its data keys, as on the pipe

A sealed frame is ``len (4 bytes) | AES-GCM(key, nonce = frame counter, wire frame)``;
each direction counts its own frames from 0, so keys are never reused with a nonce,
and a frame dropped, repeated or moved within a long stream of chunks fails to
open. Frames are bounded (:data:`appliance.jobs.wire.MAX_FRAME`), so a large
artefact crosses as many sealed chunks (:mod:`appliance.jobs.streams`) and
neither end holds more than one frame of it; a length prefix over the bound
ends the connection before anything is buffered.

Where a Ray rank's ticket comes from: never from the Ray job. The control plane and every
Ray node hold a *node key* (``APPLIANCE_RAY_NODE_KEY_FILE``, 32 random bytes distributed
like the Ray token); a launch draws a random public *nonce* and both ends derive the
ticket as ``HKDF-SHA256(node key, salt = nonce, info = "appliance-ray-ticket/1|<job_id>")``
(:func:`derive_ticket`). The Ray job's runtime_env, Ray's job table and its logs carry
the nonce and the key file's path, nothing usable: whoever reads them, or records the
traffic, can neither connect in a rank's place nor decrypt anything. Only a reader of the
key file on a node (the node's Ray user, who can run code there anyway) could; the
sandboxed worker a rank starts cannot see it. A rank the gateway has already served that
connects again fails the job loudly ("the ticket leaked").
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.jobs import wire

TICKET_BYTES = 32
#: The runtime-environment variable that hands a Ray rank its launch's public nonce.
NONCE_ENV = "APPLIANCE_TUNNEL_NONCE"
#: ... and the path of the node key on the Ray nodes (the same path as on the control plane).
NODE_KEY_ENV = "APPLIANCE_RAY_NODE_KEY_FILE"
NODE_KEY_BYTES = 32
_NONCE_BYTES = 16
_SHARE_BYTES = 32  # an X25519 public key
_LEN = struct.Struct(">I")
_MAX_PLAIN = 4096  # hello and challenge are tiny: a stranger cannot make us buffer much
_TAG_BYTES = 16
#: The largest sealed frame: one wire frame and its tag (far below AES-GCM's 2**31-1 in `cryptography`).
MAX_SEALED = wire.MAX_FRAME + _TAG_BYTES
HANDSHAKE_TIMEOUT_S = 15.0

Frame = tuple[dict[str, Any], bytes]


class TunnelError(Exception):
    """The peer failed the handshake or sent a frame that does not authenticate."""


def new_ticket() -> bytes:
    return os.urandom(TICKET_BYTES)


def new_nonce() -> bytes:
    """A launch's public nonce (goes into the Ray job's runtime_env)."""
    return os.urandom(TICKET_BYTES)


def derive_ticket(node_key: bytes, nonce: bytes, job_id: str) -> bytes:
    """The ticket of one launch of ``job_id``: only holders of the node key can compute it from the nonce."""
    if len(node_key) < NODE_KEY_BYTES:
        raise ValueError(f"node_key: {len(node_key)} bytes, need at least {NODE_KEY_BYTES} random bytes")
    if len(nonce) != TICKET_BYTES:
        raise ValueError(f"nonce: {len(nonce)} bytes, expected {TICKET_BYTES}")
    return HKDF(algorithm=SHA256(), length=TICKET_BYTES, salt=nonce,
                info=b"appliance-ray-ticket/1|" + job_id.encode()).derive(node_key)


def read_node_key(path: str | os.PathLike) -> bytes:
    """The node key from its file (raw bytes, at least :data:`NODE_KEY_BYTES`).

    Raises:
        ValueError: the file is too short, naming the path and how to make one.
    """
    with open(path, "rb") as fh:
        key = fh.read(4096)
    if len(key) < NODE_KEY_BYTES:
        raise ValueError(f"{NODE_KEY_ENV}={str(path)!r}: holds {len(key)} bytes, need at least {NODE_KEY_BYTES} "
                         f"random bytes (head -c {NODE_KEY_BYTES} /dev/urandom > FILE)")
    return key


class Tunnel:
    """One authenticated connection; :meth:`write` and :meth:`read` may run in different threads."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes) -> None:
        self.sock = sock
        self._seal, self._open = AESGCM(send_key), AESGCM(recv_key)
        self._sent = self._received = 0
        self._write_lock = threading.Lock()

    def write(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Seal and send one frame (blocking); OSError when the peer has gone."""
        body = wire.encode_prefix(header, len(payload)) + payload
        with self._write_lock:
            sealed = self._seal.encrypt(self._sent.to_bytes(12, "big"), body, None)
            self._sent += 1
            self.sock.sendall(_LEN.pack(len(sealed)) + sealed)

    def read(self) -> Frame | None:
        """The next frame; ``None`` once the peer has closed. Raises TunnelError on a forged frame."""
        head = _recv_exact(self.sock, _LEN.size)
        if head is None:
            return None
        (size,) = _LEN.unpack(head)
        if size > MAX_SEALED:
            raise TunnelError(f"a sealed frame of {size} bytes was announced; the limit is {MAX_SEALED}")
        sealed = _recv_exact(self.sock, size)
        if sealed is None:
            return None
        try:
            body = self._open.decrypt(self._received.to_bytes(12, "big"), sealed, None)
        except InvalidTag:
            raise TunnelError("a frame failed authentication (tampered, replayed or a wrong ticket)") from None
        self._received += 1
        return _decode(body)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def connect(address: tuple[str, int], *, job_id: str, rank: int, ticket: bytes,
            timeout: float = HANDSHAKE_TIMEOUT_S) -> Tunnel:
    """The worker's side: dial the control plane and prove the ticket; the start frame follows."""
    sock = socket.create_connection(address, timeout=timeout)
    try:
        nonce_w, secret = os.urandom(_NONCE_BYTES), X25519PrivateKey.generate()
        share_w = _share(secret)
        _write_plain(sock, {"type": "hello", "job_id": job_id, "rank": rank, "nonce": _b64(nonce_w),
                            "share": _b64(share_w)})
        challenge = _read_plain(sock)
        if challenge.get("type") != "challenge":
            raise TunnelError("the control plane refused the connection")
        nonce_c, share_c = _unb64(challenge.get("nonce")), _unb64(challenge.get("share"), _SHARE_BYTES)
        dh = _exchange(secret, share_c)
        k_wc, k_cw = _derive(ticket, dh, nonce_w + nonce_c + share_w + share_c, job_id, rank)
        tunnel = Tunnel(sock, send_key=k_wc, recv_key=k_cw)
        tunnel.write({"type": "ready"})
        sock.settimeout(None)
        return tunnel
    except BaseException:
        sock.close()
        raise


def accept(sock: socket.socket, ticket_for, timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Tunnel, str, int]:
    """The control plane's side of the handshake on an accepted socket.

    Args:
        sock: The accepted connection.
        ticket_for: ``(job_id, rank) -> ticket | None``; ``None`` refuses the connection.
        timeout: Seconds the peer has to complete the handshake.

    Returns:
        The tunnel, and the job id and rank the worker proved it holds the ticket for.

    Raises:
        TunnelError: Unknown job, malformed hello, or a worker without the ticket.
    """
    sock.settimeout(timeout)
    hello = _read_plain(sock)
    job_id, rank = hello.get("job_id"), hello.get("rank")
    if hello.get("type") != "hello" or not isinstance(job_id, str) or not isinstance(rank, int):
        raise TunnelError("malformed hello")
    nonce_w, share_w = _unb64(hello.get("nonce")), _unb64(hello.get("share"), _SHARE_BYTES)
    ticket = ticket_for(job_id, rank)
    if ticket is None:
        raise TunnelError(f"no launch of job {job_id!r} is waiting for rank {rank}")
    nonce_c, secret = os.urandom(_NONCE_BYTES), X25519PrivateKey.generate()
    share_c = _share(secret)
    dh = _exchange(secret, share_w)  # before answering: a low-order share gets nothing back
    _write_plain(sock, {"type": "challenge", "nonce": _b64(nonce_c), "share": _b64(share_c)})
    k_wc, k_cw = _derive(ticket, dh, nonce_w + nonce_c + share_w + share_c, job_id, rank)
    tunnel = Tunnel(sock, send_key=k_cw, recv_key=k_wc)
    ready = tunnel.read()  # TunnelError here: the worker does not hold the ticket
    if ready is None or ready[0].get("type") != "ready":
        raise TunnelError("the worker closed the connection during the handshake")
    sock.settimeout(None)
    return tunnel, job_id, rank


def _derive(ticket: bytes, dh: bytes, transcript: bytes, job_id: str, rank: int) -> tuple[bytes, bytes]:
    """Both directions' keys from the ephemeral secret and the ticket, bound to the handshake's transcript."""
    info = f"appliance-tunnel/2|{job_id}|{rank}".encode()
    keys = HKDF(algorithm=SHA256(), length=64, salt=transcript, info=info).derive(dh + ticket)
    return keys[:32], keys[32:]


def _share(secret: X25519PrivateKey) -> bytes:
    return secret.public_key().public_bytes_raw()


def _exchange(secret: X25519PrivateKey, peer_share: bytes) -> bytes:
    try:
        return secret.exchange(X25519PublicKey.from_public_bytes(peer_share))
    except ValueError:  # an all-zero (low-order) share: no shared secret
        raise TunnelError("the peer's key share is invalid") from None


def _write_plain(sock: socket.socket, header: dict[str, Any]) -> None:
    body = wire.encode(header)
    sock.sendall(_LEN.pack(len(body)) + body)


def _read_plain(sock: socket.socket) -> dict[str, Any]:
    try:
        head = _recv_exact(sock, _LEN.size)
        (size,) = _LEN.unpack(head) if head else (0,)
        if not head or size > _MAX_PLAIN:
            raise TunnelError("the peer closed or sent an oversized handshake frame")
        body = _recv_exact(sock, size)
        if body is None:
            raise TunnelError("the peer closed during the handshake")
        header, _ = _decode(body)
    except (TimeoutError, ValueError) as exc:
        raise TunnelError(f"handshake failed: {type(exc).__name__}") from None
    return header


def _decode(body: bytes) -> Frame:
    try:
        return wire.decode(body)
    except ValueError:
        raise TunnelError("a frame does not parse") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, size: int = _NONCE_BYTES) -> bytes:
    try:
        data = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        data = b""
    if len(data) != size:
        raise TunnelError("malformed nonce or key share")
    return data
