"""The Ray executor: each launch is a Ray job whose workers dial back for their start frame.

A launch opens a gateway session (a fresh ticket, the number of ranks) and
submits a Ray job through the job submission API, authenticated with the
cluster's Ray token. The job's entrypoint is the worker entry point,
``python -m appliance.jobs.ray_worker --connect HOST:PORT --job ID --workers N``
(:mod:`appliance.jobs.ray_worker`); it runs N Ray Train workers whose
ranks dial the control plane, prove the ticket and receive the same start
frame a local worker reads from its pipe.

What the Ray cluster holds: the entrypoint (address, job id, worker count)
and, in the runtime environment, the launch's public nonce, the node key's
path, the isolation level and the offline switches. Never a data key, nor
the ticket: each rank derives the ticket from the nonce and the node key
file it holds (:func:`appliance.jobs.tunnel.derive_ticket`), so Ray's job
table and logs carry nothing that opens a tunnel. Keys leave the control
plane only through a tunnel opened with the ticket, once per rank, while the
launch is live; a ticket presented twice for the same rank fails the job
(see :mod:`appliance.jobs.executors.gateway`).

Each rank runs the job in a worker sandboxed at ``APPLIANCE_WORKER_ISOLATION``
on its node, or fails closed (:mod:`appliance.jobs.ray_worker`), and says at
which level it runs: the job's events and privacy evidence list every rank.

Ray jobs are not durable here: the queue, the job's state, its checkpoints and
its adapter live in the appliance's database and blob store. A Ray job that
vanishes leaves its job ``failed`` and resumable, as a killed local worker does.
"""

from __future__ import annotations

import importlib.util
import queue
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.errors import SettingsError
from appliance.jobs.executors.gateway import Session, WorkerGateway
from appliance.jobs.streams import Opener
from appliance.jobs.isolation import IsolationLevel, grant_read
from appliance.jobs.ray_worker import ISOLATION_ENV
from appliance.jobs.sandbox import OFFLINE_ENV
from appliance.jobs.tunnel import NODE_KEY_ENV, NONCE_ENV, derive_ticket, new_nonce, read_node_key
from appliance.settings import JobSettings
STATUS_POLL_S = 2.0
REAP_TIMEOUT_S = 60.0
HUNG_UP_GRACE_S = 30.0


class RayExecutor:
    """Submits each job to the Ray cluster at ``APPLIANCE_RAY_ADDRESS``.

    Args:
        settings: The ``APPLIANCE_EXECUTOR``/``APPLIANCE_RAY_*`` settings (validated by
            :func:`appliance.settings.load_settings`).
        isolation: The level every rank's worker runs at; by default ``APPLIANCE_WORKER_ISOLATION``.
        hide: The control plane's home and key file, kept out of a rank's sandbox should a node
            share this host's file system.
    """

    name = "ray"

    def __init__(self, settings: JobSettings, isolation: IsolationLevel | str | None = None,
                 hide: Sequence[str | Path] = ()) -> None:
        _require_ray()
        self.settings = settings
        self.max_workers = settings.ray_max_workers
        self._token = settings.ray_token_file.read_text().strip()
        self._node_key_file = settings.ray_node_key_file
        self._node_key = read_node_key(settings.ray_node_key_file)
        #: the level every rank's worker runs at on its node (or the rank fails closed)
        self.isolation = IsolationLevel(isolation or settings.worker_isolation)
        self.hide = tuple(Path(p) for p in hide)
        self._client = None
        self.gateway = WorkerGateway(settings.ray_callback_address, settings.ray_callback_advertise)

    def client(self):
        """Ray's job submission client (created on first use: the cluster may start after the server)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.settings.ray_address,
                                               headers={"Authorization": f"Bearer {self._token}"})
        return self._client

    def launch(self, job_id: str, compute: dict[str, Any], reads: Sequence[str | Path] = ()) -> RayWorker:
        workers = int(compute.get("workers", 1))
        if self.isolation is IsolationLevel.SANDBOX:  # the ranks' own uids must read the base model
            for path in reads:
                if Path(path).is_dir():
                    grant_read(Path(path), list(self.hide))
        nonce = new_nonce()
        session = self.gateway.open_session(job_id, workers, derive_ticket(self._node_key, nonce, job_id))
        host, port = self.gateway.address
        python = self.settings.ray_python or sys.executable
        entrypoint = shlex.join([
            python, "-m", "appliance.jobs.ray_worker", "--connect", f"[{host}]:{port}" if ":" in host
            else f"{host}:{port}", "--job", job_id, "--workers", str(workers),
        ])
        submission_id = f"appliance-{job_id}-{secrets.token_hex(4)}"
        try:
            self.client().submit_job(
                entrypoint=entrypoint, submission_id=submission_id,
                runtime_env={"env_vars": {**OFFLINE_ENV, NONCE_ENV: nonce.hex(), NODE_KEY_ENV: str(self._node_key_file),
                                          ISOLATION_ENV: self.isolation.value}},
                metadata={"appliance_job_id": job_id, "workers": str(workers)},
            )
        except BaseException:
            self.gateway.close_session(session)
            raise
        session.deliver(({"type": "event", "level": "info", "event_type": "message",
                             "message": f"Submitted to Ray as {submission_id} with {workers} worker(s)",
                             "data": {"ray_submission_id": submission_id, "workers": workers}}, b""))
        return RayWorker(self, session, submission_id)

    def close(self) -> None:
        self.gateway.close()


def _require_ray() -> None:
    """Fail at start-up, naming the fix, rather than at the first job."""
    if importlib.util.find_spec("ray") is None:
        raise SettingsError(["APPLIANCE_EXECUTOR='ray': the `ray` package is not installed here; "
                             "install the extra (pip install 'appliance[ray]') or use APPLIANCE_EXECUTOR=local"])


class RayWorker:
    """One Ray job as the scheduler sees it: frames from its ranks, stop to all of them."""

    def __init__(self, executor: RayExecutor, session: Session, submission_id: str) -> None:
        self.executor, self.session, self.submission_id = executor, session, submission_id
        self._launched = time.monotonic()
        self._status: str | None = None
        self._polled = 0.0
        self._lost: str | None = None
        self._hung_up_at: float | None = None

    def start(self, header: dict[str, Any], resume: Opener | None = None) -> None:
        self.session.offer_start({**header, "executor": "ray"}, resume)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if payload:
            raise ValueError("frames to Ray ranks carry no payload; stream artefacts (appliance.jobs.streams)")
        if header.get("type") == "start":
            self.start(header)
        else:
            self.session.broadcast(header)

    def read(self, timeout: float) -> tuple[dict[str, Any], bytes] | None:
        try:
            return self.session.frames.get(timeout=timeout)
        except queue.Empty:
            return None

    def alive(self) -> bool:
        if not self.session.frames.empty():
            return True
        if self._terminal(self._poll()):
            return self.session.any_open()  # the ranks' last frames may still be on their way
        if self.session.all_connected() and not self.session.any_open():
            # Every rank hung up but Ray does not say the job ended (its dashboard may be unreachable).
            self._hung_up_at = self._hung_up_at or time.monotonic()
            if time.monotonic() - self._hung_up_at > HUNG_UP_GRACE_S:
                self._lost = f"every worker hung up and Ray reported no end within {HUNG_UP_GRACE_S:.0f}s"
                self.kill()
                return False
        timeout = self.executor.settings.ray_connect_timeout_s
        if not self.session.all_connected() and time.monotonic() - self._launched > timeout:
            self._lost = f"its workers did not connect within {timeout}s (APPLIANCE_RAY_CONNECT_TIMEOUT_S)"
            self.kill()
            return False
        return True

    def kill(self) -> None:
        try:
            self.executor.client().stop_job(self.submission_id)
        except Exception:  # already gone, or the cluster is unreachable: nothing more to stop here
            pass
        self.session.close()

    def reap(self) -> None:
        deadline = time.monotonic() + REAP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._terminal(self._poll(force=True)):
                return
            time.sleep(0.5)
        self.kill()

    def exit_detail(self) -> str:
        # Ray's own message quotes the job's last log lines, which may quote data: never copied.
        status = self._poll(force=True) or "unknown"
        return f" (Ray job {self.submission_id} {status.lower()}" + (f": {self._lost})" if self._lost else ")")

    def cleanup(self) -> None:
        self.executor.gateway.close_session(self.session)

    def _poll(self, force: bool = False) -> str | None:
        now = time.monotonic()
        if force or now - self._polled >= STATUS_POLL_S:
            self._polled = now
            try:
                self._status = str(self.executor.client().get_job_status(self.submission_id).value)
            except Exception:  # a transient outage of the dashboard is not the job's end
                pass
        return self._status

    @staticmethod
    def _terminal(status: str | None) -> bool:
        return status in ("STOPPED", "SUCCEEDED", "FAILED")
