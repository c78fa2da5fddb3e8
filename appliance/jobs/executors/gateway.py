"""The control plane's listener for remote workers: tickets in, start frames out, frames back.

Each launch opens a :class:`Session` with a fresh ticket and the number of
ranks it expects. A worker dials in, proves the ticket for its job and rank
(:func:`appliance.jobs.tunnel.accept`) and receives the start frame, data
keys included, over the encrypted tunnel; each rank is served once, and the
keys are dropped from memory as soon as every rank has them. Rank 0 reports
(events, checkpoints, artefacts, the result); other ranks may only report an
error and, once, the isolation level they run at (stamped with their rank here).
A second connection for a rank already served means the ticket leaked:
the session refuses it and fails the job.

Frames from the ranks wait in a bounded queue: when the scheduler falls behind
(a checkpoint streaming in faster than it is encrypted to disk) the pump stops
reading, TCP pushes back on the worker, and the control plane's memory stays
bounded. A checkpoint to resume from is streamed to each rank after its start
frame (:mod:`appliance.jobs.streams`), decrypted from storage chunk by chunk.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from typing import Any

from appliance.jobs import streams, tunnel
from appliance.settings import parse_host_port

log = logging.getLogger("appliance.jobs.gateway")

START_WAIT_S = 60.0
#: Frames (each at most a chunk) waiting for the scheduler before the pump stops reading.
QUEUED_FRAMES = 16
_PUT_POLL_S = 0.5
Frame = tuple[dict[str, Any], bytes]


class Session:
    """One launch of one job: its ticket, the start frame its ranks receive, what they send back."""

    def __init__(self, job_id: str, ranks: int, ticket: bytes | None = None) -> None:
        self.job_id, self.ranks = job_id, ranks
        self.ticket = ticket if ticket is not None else tunnel.new_ticket()
        self.frames: queue.Queue[Frame] = queue.Queue(maxsize=QUEUED_FRAMES)
        self._start: tuple[dict[str, Any], streams.Opener | None] | None = None
        self._start_offered = threading.Event()
        self._tunnels: dict[int, tunnel.Tunnel] = {}
        self._open: set[int] = set()
        self._served: set[int] = set()
        self._lock = threading.Lock()
        self.closed = False

    # -- the scheduler's side -------------------------------------------------
    def offer_start(self, header: dict[str, Any], resume: streams.Opener | None = None) -> None:
        """Hold the start frame for the ranks (a copy: the caller drops its data keys at once).

        Args:
            header: The start frame.
            resume: Opens the checkpoint to resume from, streamed to each rank after the start frame.
        """
        with self._lock:
            if not self.closed:
                self._start = (dict(header, resume_stream=resume is not None), resume)
        self._start_offered.set()

    def deliver(self, frame: Frame) -> bool:
        """Queue a frame for the scheduler, waiting while the queue is full; False once the session closed."""
        while not self.closed:
            try:
                self.frames.put(frame, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def broadcast(self, header: dict[str, Any]) -> None:
        """Send a control frame (``stop``) to every connected rank."""
        with self._lock:
            tunnels = list(self._tunnels.values())
        for t in tunnels:
            try:
                t.write(header)
            except OSError:
                pass

    def all_connected(self) -> bool:
        with self._lock:
            return len(self._tunnels) == self.ranks

    def any_open(self) -> bool:
        with self._lock:
            return bool(self._open)

    def close(self) -> None:
        """Forget the ticket and the start frame, and hang up on every rank."""
        with self._lock:
            self.closed = True
            self._start = None
            tunnels = list(self._tunnels.values())
        self._start_offered.set()
        for t in tunnels:
            t.close()

    # -- the gateway's side ---------------------------------------------------
    def ticket_for(self, rank: int) -> bytes | None:
        with self._lock:
            if self.closed or not 0 <= rank < self.ranks:
                return None
            if rank not in self._tunnels:
                return self.ticket
        # A valid ticket a second time: someone else holds it. Fail the job rather than race.
        self.deliver(({"type": "error", "code": "worker_auth_failed", "param": None,
                       "message": f"a second worker presented this launch's ticket for rank {rank}, so "
                                  "the ticket leaked: the job was stopped; check who can read the Ray "
                                  "cluster's job details"}, b""))
        return None

    def serve(self, rank: int, conn: tunnel.Tunnel) -> None:
        """Give an authenticated rank its start frame, then pump its frames into :attr:`frames`."""
        with self._lock:
            if self.closed or rank in self._tunnels:
                conn.close()
                return
            self._tunnels[rank] = conn
            self._open.add(rank)
        try:
            self._start_offered.wait(START_WAIT_S)
            with self._lock:
                start = self._start
                self._served.add(rank)
                if len(self._served) == self.ranks:
                    self._start = None  # every rank has its copy: no data key stays here
            if start is None:
                return
            header, resume = start
            del start
            conn.write(header)
            del header
            if resume is not None:
                streams.send(conn.write, {"kind": "resume"}, resume())
                del resume
            self._pump(rank, conn)
        except (OSError, tunnel.TunnelError) as exc:
            log.warning("worker connection ended", extra={"job_id": self.job_id, "rank": rank,
                                                           "error": type(exc).__name__})
        except Exception:  # the resume checkpoint could not be read (shredded, tampered): the run cannot start
            log.exception("streaming the resume checkpoint to a worker failed",
                          extra={"job_id": self.job_id, "rank": rank})
            self.deliver(({"type": "error", "code": "worker_error", "param": None,
                           "message": f"the checkpoint to resume from could not be sent to rank {rank}"}, b""))
        finally:
            conn.close()
            with self._lock:
                self._open.discard(rank)

    def _pump(self, rank: int, conn: tunnel.Tunnel) -> None:
        placed = False  # each rank says once at which isolation level it runs
        while (frame := conn.read()) is not None:
            header = frame[0]
            isolation = header.get("type") == "event" and header.get("event_type") == "isolation" and not placed
            if isolation:
                placed = True
                frame = ({**header, "data": {**(header.get("data") or {}), "rank": rank}}, b"")
            if (rank == 0 or isolation or header.get("type") == "error") and not self.deliver(frame):
                return


class WorkerGateway:
    """A TCP listener for remote workers; one thread per connection.

    Args:
        bind: ``host:port`` to listen on (port 0: any free port).
        advertise: ``host:port`` the workers dial; empty means the bound address.
    """

    def __init__(self, bind: str, advertise: str = "") -> None:
        self._bind, self._advertise = parse_host_port(bind), advertise
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where workers dial (the listener starts on first use)."""
        self.start()
        if self._advertise:
            return parse_host_port(self._advertise)
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            host, port = self._bind
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(64)
            self._listener = listener
            self._thread = threading.Thread(target=self._accept_loop, name="worker-gateway", daemon=True)
            self._thread.start()

    def open_session(self, job_id: str, ranks: int, ticket: bytes | None = None) -> Session:
        """A launch's session; ``ticket`` derived from the node key (Ray), else a random one."""
        session = Session(job_id, ranks, ticket)
        with self._lock:
            previous = self._sessions.get(job_id)
            self._sessions[job_id] = session
        if previous is not None:
            previous.close()
        return session

    def close_session(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.job_id) is session:
                del self._sessions[session.job_id]
        session.close()

    def close(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                sock, peer = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(sock, peer), name="worker-conn", daemon=True).start()

    def _ticket_for(self, job_id: str, rank: int) -> bytes | None:
        with self._lock:
            session = self._sessions.get(job_id)
        return session.ticket_for(rank) if session is not None else None

    def _handle(self, sock: socket.socket, peer: Any) -> None:
        try:
            conn, job_id, rank = tunnel.accept(sock, self._ticket_for)
        except (OSError, tunnel.TunnelError) as exc:
            log.warning("refused a worker connection", extra={"peer": str(peer[0]), "reason": str(exc)[:200]})
            sock.close()
            return
        with self._lock:
            session = self._sessions.get(job_id)
        if session is None:
            conn.close()
            return
        session.serve(rank, conn)
