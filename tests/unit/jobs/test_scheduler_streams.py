"""The control plane's side of artefact streams: chunks encrypted into storage as they arrive, nothing left of a
broken stream, and bounded memory while a 1 GiB checkpoint comes in through a real pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from appliance.crypto.stream import IntegrityError
from appliance.identity.models import Project
from appliance.jobs import streams
from appliance.jobs.models import FineTuningJob, JobCheckpoint
from appliance.jobs.scheduler import _Inbox, _Run
from appliance.jobs.service import Phase
from appliance.jobs.wire import MAX_PAYLOAD, FrameError, FrameReader
from tests.timing import scaled

REPO = Path(__file__).resolve().parents[3]
MiB = 1 << 20


class FakeWorker:
    """A worker that has sent ``frames`` and then ended (or is killed by the scheduler)."""

    def __init__(self, frames: list[tuple[dict, bytes]]) -> None:
        self.frames, self.killed, self.started = list(frames), False, None

    def start(self, header, resume=None) -> None:
        self.started, self.resumed = header, []
        if resume is not None:  # as the executors do: stream it, decrypting as it goes
            streams.send(lambda h, p: self.resumed.append((h, bytes(p))), {"kind": "resume"}, resume())

    def send(self, header, payload=b"") -> None:
        pass

    def read(self, timeout: float):
        return self.frames.pop(0) if self.frames and not self.killed else None

    def alive(self) -> bool:
        return bool(self.frames) and not self.killed

    def kill(self) -> None:
        self.killed = True

    def reap(self) -> None:
        pass

    def exit_detail(self) -> str:
        return " (exit 3)"

    def cleanup(self) -> None:
        pass


def _running_job(state, job_id: str = "ftjob-streams") -> str:
    """A job row that ``state.scheduler`` holds the lease of (attempt 1); its project's name."""
    with state.db.transaction() as s:
        project = s.scalar(select(Project).order_by(Project.id).limit(1))
        if project is None:
            project = Project(name="acme")
            s.add(project)
            s.flush()
        s.add(FineTuningJob(id=job_id, project_id=project.id, created_by="test", model="base", training_file="file-x",
                            seed=0, method_type="supervised", status="running", worker=state.scheduler.name,
                            attempts=1))
        return project.name


def _blob_files(state) -> set[Path]:
    return {p for p in state.blobs.root.rglob("*") if p.is_file()}


def _stream(header: dict, data: bytes, chunk_bytes: int = 1000) -> list[tuple[dict, bytes]]:
    sent: list[tuple[dict, bytes]] = []
    streams.send(lambda h, p: sent.append((h, bytes(p))), header, data, chunk_bytes=chunk_bytes)
    return sent


def _supervise(state, frames, resume=None) -> tuple[FineTuningJob, list[JobCheckpoint], FakeWorker]:
    project = _running_job(state)
    worker = FakeWorker(frames)
    state.scheduler._supervise(_Run("ftjob-streams", 1, worker), {"project": project, "datasets": []},  # noqa: SLF001
                               resume)
    with state.db.read() as s:
        job = s.get(FineTuningJob, "ftjob-streams")
        checkpoints = list(s.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)))
        s.expunge_all()
    return job, checkpoints, worker


def _corrupt(frames, index: int):
    header, payload = frames[index]
    frames[index] = (header, bytes([payload[0] ^ 1]) + payload[1:])
    return frames


@pytest.mark.parametrize(("fault", "code"), [
    ("corrupted chunk", "transfer_failed"),
    ("ends short", "transfer_failed"),
    ("worker dies mid-stream", "worker_lost"),
    ("result before the end", "transfer_failed"),
])
def test_a_broken_checkpoint_stream_stores_nothing_and_fails_the_job_resumable(state, fault, code):
    before = _blob_files(state)
    frames = _stream({"kind": "checkpoint", "step": 3, "metrics": {}}, os.urandom(5000))
    frames = {
        "corrupted chunk": lambda f: _corrupt(f, 2),
        "ends short": lambda f: f[:3] + f[-1:],
        "worker dies mid-stream": lambda f: f[:3],
        "result before the end": lambda f: [*f[:3], ({"type": "result", "metrics": {}}, b"")],
    }[fault](frames)
    job, checkpoints, worker = _supervise(state, frames)
    assert job.status == "failed" and job.error["code"] == code and job.resumable
    if code == "transfer_failed":
        assert "did not arrive intact" in job.error["message"] and worker.killed
    assert checkpoints == [] and _blob_files(state) == before  # no blob, no temporary


def test_a_good_checkpoint_is_kept_and_a_broken_adapter_file_discards_the_whole_adapter(state):
    before = _blob_files(state)
    ckpt = os.urandom(3000)
    frames = [*_stream({"kind": "checkpoint", "step": 3, "metrics": {}}, ckpt),
              *_stream({"kind": "artifact", "name": "adapter_config.json"}, b"{}"),
              *_corrupt(_stream({"kind": "artifact", "name": "adapter_model.safetensors"}, os.urandom(4000)), 3)]
    job, checkpoints, _ = _supervise(state, frames)
    assert job.error["code"] == "transfer_failed"
    (checkpoint,) = checkpoints
    assert checkpoint.step_number == 3
    with state.db.read() as s:
        assert b"".join(state.blobs.read(s, checkpoint.object_id)) == ckpt
    assert _blob_files(state) == before | {state.blobs.path_of(checkpoint.object_id)}  # no adapter, no temporary


def test_a_frame_with_an_absurd_length_mid_stream_fails_the_job_and_stores_nothing(state):
    before = _blob_files(state)
    frames = _stream({"kind": "checkpoint", "step": 3, "metrics": {}}, os.urandom(5000))[:2]

    class Garbled(FakeWorker):
        def read(self, timeout: float):
            if self.frames:
                return super().read(timeout)
            raise FrameError(f"frame payload of {5 << 30} bytes declared; the limit is {MAX_PAYLOAD}")

    worker = Garbled(frames)
    project = _running_job(state)
    state.scheduler._supervise(_Run("ftjob-streams", 1, worker), {"project": project, "datasets": []}, None)  # noqa: SLF001
    with state.db.read() as s:
        job = s.get(FineTuningJob, "ftjob-streams")
        assert job.error["code"] == "transfer_failed" and "5368709120 bytes declared" in job.error["message"]
    assert worker.killed and _blob_files(state) == before


def test_an_adapter_file_out_of_name_order_or_with_a_bad_name_is_refused(state):
    frames = [*_stream({"kind": "artifact", "name": "b.json"}, b"{}"),
              *_stream({"kind": "artifact", "name": "a.json"}, b"{}")]
    job, _, _ = _supervise(state, frames)
    assert job.error["code"] == "transfer_failed" and "must come in name order" in job.error["message"]


def test_a_resume_checkpoint_that_cannot_be_read_fails_the_start_resumable(state):
    def tampered():
        yield b"the first segment"
        raise IntegrityError("encrypted blob is truncated")

    job, _, worker = _supervise(state, [], resume=tampered)
    assert worker.killed and job.status == "failed" and job.resumable
    assert job.error == {"code": "worker_start_failed", "param": None,
                         "message": "could not start the worker: IntegrityError"}


def test_the_resume_checkpoint_streams_from_its_blob(state):
    data = os.urandom(200_000)
    with state.blobs.writing("ftckpt-resume", "acme", "checkpoint") as writer:
        writer.write(data)
        key_row = writer.finish()
    with state.db.transaction() as s:
        s.add(key_row)
    with state.db.read() as s:
        opener = state.blobs.opener(s, "ftckpt-resume")
    _, _, worker = _supervise(state, [], resume=opener)
    out = streams.Buffer()
    streams.receive(iter(worker.resumed).__next__, out, kind="resume")
    assert out == data and worker.started["project"]


SENDER = """
import sys
from pathlib import Path
from appliance.jobs.channel import Channel, PipeTransport

channel = Channel(PipeTransport(0, int(sys.argv[1])))
channel.send_artefact({"kind": "checkpoint", "step": 5, "metrics": {}}, Path(sys.argv[2]))
"""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


@pytest.mark.slow
def test_receiving_a_1_gib_checkpoint_grows_the_control_planes_rss_by_under_64_mib(state, tmp_path):
    """A real worker-side sender reads a 1 GiB checkpoint file from disk in chunks into a real pipe; the
    scheduler's frame handling encrypts it into storage. RSS is sampled every 5 ms and the kernel's peak
    (VmHWM, reset through /proc/self/clear_refs) read at the end."""
    size = 1 << 30
    project = _running_job(state)
    ckpt = tmp_path / "checkpoint.bin"
    with ckpt.open("wb") as fh:
        fh.truncate(size)  # sparse: 1 GiB of zeros that costs no disk; the sender still reads every byte
    r, w = os.pipe()
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(w), str(ckpt)], pass_fds=(w,), cwd=REPO,
                              stdin=subprocess.DEVNULL)
    os.close(w)
    reader, inbox = FrameReader(r), _Inbox(project=project)

    peak_sampled = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_sampled[0] = max(peak_sampled[0], _status_kib("VmRSS"))
            time.sleep(0.005)

    baseline = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        while (frame := reader.read(timeout=scaled(120))) is not None:
            state.scheduler._handle("ftjob-streams", frame, inbox)  # noqa: SLF001
    finally:
        done.set()
        sampler.join()
        os.close(r)
        sender.wait(timeout=scaled(60))
    elapsed = time.monotonic() - started
    peak = max(peak_sampled[0], _status_kib("VmHWM") if hwm_reset else 0)
    growth_mib = (peak - baseline) / 1024
    print(f"\n1 GiB checkpoint received in {elapsed:.1f}s; RSS {baseline / 1024:.0f} MiB -> peak "
          f"{peak / 1024:.0f} MiB (+{growth_mib:.1f} MiB; VmHWM reset: {hwm_reset})")
    assert sender.returncode == 0
    assert growth_mib < 64, f"the control plane's RSS grew by {growth_mib:.1f} MiB receiving 1 GiB"
    with state.db.read() as s:
        (row,) = s.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == "ftjob-streams"))
        total = 0
        for chunk in state.blobs.read(s, row.object_id):
            assert not chunk.strip(b"\0")
            total += len(chunk)
    assert row.step_number == 5 and total == size


def test_the_finish_estimate_follows_the_pace_of_this_attempt():
    from appliance.jobs.scheduler import _Inbox

    inbox = _Inbox(project="acme")
    assert inbox.estimate_finish(10, 100, now=1000.0) is None  # the first report only sets the origin
    assert inbox.estimate_finish(10, 100, now=1001.0) is None  # no step made yet
    assert inbox.estimate_finish(20, 100, now=1020.0) == pytest.approx(160.0)  # 2 s a step, 80 steps left
    assert inbox.estimate_finish(100, 100, now=1180.0) == 0.0
    assert inbox.estimate_finish(None, 100) is None and inbox.estimate_finish(5, 0) is None
    assert inbox.estimate_finish(True, 100) is None


def test_progress_reports_set_the_jobs_estimated_finish(state):
    """Each metrics event after the first moves OpenAI's ``estimated_finish`` to now plus the steps left at
    this attempt's pace; other events leave it alone."""
    from datetime import timedelta

    from appliance.db.base import utcnow

    job_id = "ftjob-streams"
    inbox = _Inbox(project=_running_job(state, job_id))

    def report(step: int) -> None:
        state.scheduler._handle(job_id, ({"type": "event", "event_type": "metrics", "message": f"Step {step}/100",  # noqa: SLF001
                                          "data": {"step": step, "total_steps": 100}}, b""), inbox)

    def estimate():
        with state.db.read() as s:
            return s.get(FineTuningJob, job_id).estimated_finish

    report(10)
    assert estimate() is None  # one report gives no pace yet
    inbox.first_progress = (inbox.first_progress[0] - 20.0, 10)  # as if step 10 came 20 s ago: 2 s a step
    report(20)
    left = (estimate() - utcnow()).total_seconds()
    assert 150 < left <= 161  # 80 steps x 2 s
    state.scheduler._handle(job_id, ({"type": "event", "message": "hello"}, b""), inbox)  # noqa: SLF001
    assert abs((estimate() - utcnow()).total_seconds() - left) < 5
    assert state.jobs.progress([job_id, "ftjob-none"]) == {job_id: (20, 100, None)}
    assert utcnow() + timedelta(seconds=100) < estimate()
    # After training, a post-training phase's own estimate is the time left, and the lists show the phase
    for done, left in ((1, 300), (4, 0)):
        state.scheduler._handle(job_id, ({"type": "event", "event_type": "metrics",  # noqa: SLF001
                                          "message": f"canary exposure: canary {done} of 4",
                                          "data": {"step": 100, "total_steps": 100, "phase": {
                                              "name": "canary exposure", "done": done, "total": 4,
                                              "seconds_left": left}}}, b""), inbox)
        if done == 1:
            assert 290 < (estimate() - utcnow()).total_seconds() <= 300
            assert state.jobs.progress([job_id]) == {job_id: (100, 100, Phase("canary exposure", 1, 4, 300))}
    assert state.jobs.progress([job_id]) == {job_id: (100, 100, None)}  # a finished phase is no longer shown


def test_progress_lines_carry_their_numbers():
    from appliance.jobs.tasks import _progress_message
    from appliance.training.results import TrainingEvent

    train = TrainingEvent(type="train", step=30, total_steps=48, epoch=1.0, train_loss=1.23456)
    assert _progress_message(train) == "Step 30/48: training loss 1.2346"
    before = TrainingEvent(type="validation", step=0, total_steps=48, epoch=0.0, valid_loss=2.65,
                           message="validation loss before training")
    assert _progress_message(before) == "validation loss before training 2.6500"
    info = TrainingEvent(type="info", step=0, total_steps=48, epoch=0.0, message="memory plan: ...")
    assert _progress_message(info) == "memory plan: ..."
