"""The Ray executor's bookkeeping against a fake job submission client: what Ray is given, when a job is lost."""

from __future__ import annotations

import base64
import shlex
import threading

import pytest

from appliance.jobs import tunnel
from appliance.jobs.executors import ray as ray_executor
from appliance.settings import JobSettings
from tests.timing import scaled


class FakeJobs:
    """Ray's JobSubmissionClient, reduced to what the executor calls."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []
        self.stopped: list[str] = []
        self.status = "PENDING"

    def submit_job(self, **kwargs) -> str:
        self.submitted.append(kwargs)
        return kwargs["submission_id"]

    def get_job_status(self, submission_id):
        class Status:
            value = self.status

        return Status()

    def stop_job(self, submission_id) -> bool:
        self.stopped.append(submission_id)
        self.status = "STOPPED"
        return True


@pytest.fixture
def executor(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_executor, "_require_ray", lambda: None)
    token = tmp_path / "ray.token"
    token.write_text("cluster-token\n")
    node_key = tmp_path / "node.key"
    node_key.write_bytes(b"n" * 32)
    ex = ray_executor.RayExecutor(JobSettings(executor="ray", ray_address="http://127.0.0.1:1",
                                              ray_token_file=token, ray_node_key_file=node_key,
                                              ray_connect_timeout_s=10))
    ex._client = FakeJobs()  # noqa: SLF001
    yield ex
    ex.close()


def test_the_ray_job_gets_the_entrypoint_and_a_nonce_never_the_ticket_nor_a_data_key(executor):
    worker = executor.launch("ftjob-1", {"workers": 2})
    data_key = base64.b64encode(b"k" * 32).decode()
    worker.send({"type": "start", "datasets": [{"key": data_key}]}, b"")
    (job,) = executor.client().submitted
    argv = shlex.split(job["entrypoint"])
    host, port = executor.gateway.address
    assert argv[1:] == ["-m", "appliance.jobs.ray_worker", "--connect", f"{host}:{port}",
                        "--job", "ftjob-1", "--workers", "2"]
    env = job["runtime_env"]["env_vars"]
    # What Ray holds opens nothing: a public nonce and the key file's path; a rank derives the ticket
    # from them and the node key, which only the nodes and the control plane hold.
    nonce = bytes.fromhex(env[tunnel.NONCE_ENV])
    assert env[tunnel.NODE_KEY_ENV] == str(executor.settings.ray_node_key_file)
    assert tunnel.derive_ticket(b"n" * 32, nonce, "ftjob-1") == worker.session.ticket
    assert env["APPLIANCE_WORKER_ISOLATION"] == "sandbox"
    ticket = worker.session.ticket
    for form in (ticket.hex(), base64.b64encode(ticket).decode(), base64.urlsafe_b64encode(ticket).decode()):
        assert form not in repr(job)
    assert env["HF_HUB_OFFLINE"] == "1" and job["metadata"] == {"appliance_job_id": "ftjob-1", "workers": "2"}
    assert data_key not in repr(job)
    # A second launch of the same job draws another nonce, hence another ticket.
    again = executor.launch("ftjob-1", {"workers": 2})
    assert again.session.ticket != ticket
    header, _ = worker.read(timeout=scaled(1))
    assert header["message"].startswith("Submitted to Ray as appliance-ftjob-1-")
    # The ranks dial in and get the start frame, marked as a Ray run.
    again.cleanup()
    worker = executor.launch("ftjob-1", {"workers": 2})
    worker.read(timeout=scaled(1))
    worker.send({"type": "start", "datasets": [{"key": data_key}]}, b"")
    conn = tunnel.connect(executor.gateway.address, job_id="ftjob-1", rank=0, ticket=worker.session.ticket)
    start, _ = conn.read()
    assert start["executor"] == "ray" and start["datasets"][0]["key"] == data_key
    conn.close()
    worker.cleanup()


def test_workers_that_never_connect_make_the_job_lost(executor, monkeypatch):
    worker = executor.launch("ftjob-1", {})
    worker.read(timeout=scaled(1))  # the "submitted" event
    assert worker.alive()
    monkeypatch.setattr(worker, "_launched", worker._launched - 11)  # noqa: SLF001
    assert not worker.alive()
    assert executor.client().stopped == [worker.submission_id]
    assert "did not connect within 10s" in worker.exit_detail() and "stopped" in worker.exit_detail()


def test_a_finished_ray_job_is_not_alive_once_its_ranks_have_hung_up(executor):
    worker = executor.launch("ftjob-1", {})
    worker.read(timeout=scaled(1))
    executor.client().status = "FAILED"
    worker._polled = 0  # noqa: SLF001 - poll now
    assert not worker.alive()
    assert worker.exit_detail() == f" (Ray job {worker.submission_id} failed)"


class _Tunnel:
    """A rank's tunnel, reduced to the frames it carries."""

    def __init__(self, frames: list) -> None:
        self.incoming, self.written = list(frames), []
        self.closed = threading.Event()

    def read(self):
        if self.incoming:
            return self.incoming.pop(0)
        self.closed.wait(60)  # the control plane stays on the line until the rank hangs up
        return None

    def close(self) -> None:
        self.closed.set()

    def write(self, header, payload=b""):
        self.written.append((header, payload))


def test_a_ray_rank_whose_sandbox_cannot_be_built_fails_closed_and_says_why(monkeypatch):
    from appliance.jobs import ray_worker, sandbox
    from appliance.jobs.isolation import IsolationLevel, SandboxUnavailable

    def unavailable(*args, **kwargs):
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed: install Debian's bubblewrap "
                                 "(apt-get install bubblewrap)")

    monkeypatch.setattr(sandbox, "spawn", unavailable)
    conn = _Tunnel([({"type": "start", "model_dir": "/models/m", "datasets": [{"path": "/blobs/a", "key": "k"}]},
                     b"")])
    assert ray_worker._run_rank(conn, rank=1, world=1, level=IsolationLevel.SANDBOX, hide=[]) == 1  # noqa: SLF001
    ((error, _),) = conn.written
    assert error["type"] == "error" and error["code"] == "worker_sandbox_unavailable"
    assert "rank 1" in error["message"] and "apt-get install bubblewrap" in error["message"]


def test_a_ray_rank_with_one_worker_runs_it_in_the_sandbox_without_network_and_relays_its_frames(tmp_path):
    """Rank 0 of a one-rank job: its worker gets no network, the dataset blob as a descriptor, the start
    frame marked primary; what it sends comes back up the tunnel after the rank's placement event."""
    from appliance.jobs import ray_worker
    from appliance.jobs.isolation import IsolationLevel

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    blob = tmp_path / "blob"
    blob.write_bytes(b"ciphertext")
    conn = _Tunnel([({"type": "start", "model_dir": str(model_dir), "model_kind": "llm", "datasets": [
        {"role": "train", "path": str(blob), "key": "not-a-real-key", "object_id": "file-1", "project": "p"}]}, b"")])
    # The worker fails at decryption (a fake key): its error frame is what travels back.
    try:
        code = ray_worker._run_rank(conn, rank=0, world=1, level=IsolationLevel.SANDBOX, hide=[])  # noqa: SLF001
    finally:
        conn.close()
    assert code == 1
    headers = [h for h, _ in conn.written]
    placed = headers[0]
    assert placed["event_type"] == "isolation" and placed["data"]["level"] == "sandbox"
    assert placed["data"]["network"] == "none" and placed["data"]["rank"] == 0
    probe = next(h for h in headers[1:] if h.get("event_type") == "isolation")
    assert "Network isolation verified" in probe["message"], probe
    assert headers[-1]["type"] == "error"
