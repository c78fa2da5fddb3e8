"""The job queue: claims jobs, runs each in an isolated worker, records what it reports.

One scheduler runs inside each server process; several servers (control-plane
replicas) may share one PostgreSQL database. A scheduler claims the oldest
queued job under a row lock (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
replicas claiming at once take different jobs; on SQLite ``BEGIN IMMEDIATE``
makes the claiming transaction the only writer), starts a sandboxed worker per
job through its executor (a sandboxed process on this host, or a Ray job:
:mod:`appliance.jobs.executors`; one job per device by default), hands it the
job and its datasets' data keys, and stores events, encrypted checkpoints and
the final adapter. Artefacts travel both ways as streams of bounded chunks
(:mod:`appliance.jobs.streams`): each chunk from the worker is encrypted into
its blob as it arrives, so a checkpoint of any size costs the control plane a
chunk of memory, and one that arrives short or corrupted leaves nothing behind.

A claim is a lease: the job row names the scheduler (``worker``) and when its
ownership ends (``lease_expires_at``), which the scheduler renews while it
supervises the worker. Any scheduler fails (resumable) a running job whose
lease has expired, or whose owner was a process on the same host that has
exited (a restarted server needs no wait). An owner that finds its lease gone
kills its worker and records nothing more for that attempt. A worker that
dies, or a server that was killed, leaves the job ``failed`` with a resumable
error, never ``running``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update

from appliance.audit.service import AuditContext, record
from appliance.catalog.archive import AdapterArchive
from appliance.catalog.service import CatalogService
from appliance.db.base import Database, utcnow
from appliance.files.service import FileService, new_file_id
from appliance.identity.service import project_by_id, project_name
from appliance.jobs.executors import Executor, LocalExecutor, Worker
from appliance.jobs.isolation import IsolationLevel, SandboxUnavailable
from appliance.jobs.isolation import check as isolation_problem
from appliance.jobs.models import FineTuningJob, JobCheckpoint
from appliance.jobs.sandbox import WorkerLimits, sweep_orphaned_tmpdirs
from appliance.jobs.search_runner import SearchRunner
from appliance.jobs.service import add_event
from appliance.jobs.streams import Incoming, Opener, Receiver, StreamError
from appliance.jobs.wire import FrameError
from appliance.storage.blobs import BlobWriter

log = logging.getLogger("appliance.jobs")

SYSTEM = AuditContext(actor="system:scheduler", auth_method="internal", origin_ip="local")
RESUMABLE_LOST = {
    "code": "worker_lost",
    "message": "the training worker stopped unexpectedly (killed or the server restarted); "
               "resume the job to continue from its last checkpoint",
    "param": None,
}
#: Error codes after which the job may be resumed from its last checkpoint.
RESUMABLE_ERRORS = frozenset({"worker_error", "worker_start_failed", "worker_sandbox_unavailable", "transfer_failed"})


@dataclass
class SchedulerSettings:
    """How a scheduler runs jobs.

    Attributes:
        max_concurrent: Workers at once (one per device).
        poll_s: Longest wait between looks at the queue.
        cancel_grace_s: Time a worker gets to stop before it is killed.
        lease_s: How long a claimed job stays this scheduler's without renewal; renewed every
            ``lease_s / 6``. Replicas' clocks must agree to well within it (NTP).
    """

    max_concurrent: int = 1
    poll_s: float = 0.5
    cancel_grace_s: float = 10.0
    lease_s: float = 60.0
    worker_module: str = "appliance.jobs.worker"
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    isolation: IsolationLevel = IsolationLevel.SANDBOX
    #: Where workers run; None: sandboxed local processes from the three fields above.
    executor: Executor | None = None


@dataclass
class _Run:
    job_id: str
    attempt: int
    worker: Worker
    thread: threading.Thread | None = None
    stop_sent_at: float | None = None
    #: set when another scheduler took the job over: the worker is killed, its reports dropped
    lost: bool = False
    #: set once the worker ended and its outcome is about to be recorded
    ending: bool = False


@dataclass
class _Inbox:
    """What a run is receiving from its worker: the artefact streaming in, the adapter archive filling up."""

    project: str
    streams: Receiver = field(default_factory=Receiver)
    #: the adapter's files, encrypted into storage as they arrive; published on success, else discarded
    archive: AdapterArchive | None = None
    #: where each Ray rank's worker ran: {"rank", "level", "network"}, as the ranks reported it
    ranks: list[dict[str, Any]] = field(default_factory=list)
    #: the first progress report of this attempt: (monotonic time, step), the origin of the finish estimate
    first_progress: tuple[float, int] | None = None

    def estimate_finish(self, step: Any, total: Any, now: float | None = None) -> float | None:
        """Seconds until the last training step, from this attempt's pace so far (None before a second report)."""
        if not isinstance(step, int) or not isinstance(total, int) or isinstance(step, bool) or total <= 0:
            return None
        now = time.monotonic() if now is None else now
        if self.first_progress is None or step < self.first_progress[1]:
            self.first_progress = (now, step)
            return None
        t0, s0 = self.first_progress
        if step == s0 or now <= t0:
            return None
        return max(0.0, (now - t0) / (step - s0) * (total - step))

    def discard(self) -> None:
        """Abort whatever was not stored: the open stream's blob and an unpublished adapter."""
        self.streams.abandon()
        if self.archive is not None:
            self.archive.abort()
            self.archive = None


def _remaining(inbox: _Inbox, data: dict[str, Any]) -> float | None:
    """Seconds left, from a progress report: a post-training phase's own estimate once training is done
    (canary exposure, the extraction probe), else the training steps' pace."""
    phase = data.get("phase")
    if isinstance(phase, dict):
        left = phase.get("seconds_left")
        return float(left) if isinstance(left, (int, float)) and not isinstance(left, bool) and left >= 0 else None
    return inbox.estimate_finish(data.get("step"), data.get("total_steps"))


class Scheduler:
    """Runs queued jobs in sandboxed workers.

    Args:
        db: The database.
        blobs: Encrypted storage (datasets in, checkpoints and adapters out).
        catalog: Base models and adapter publishing.
        settings: Concurrency, polling and worker limits.

    Attributes:
        busy: True while something else holds this host's training device (a running evaluation):
            no job is claimed meanwhile, as a job's memory plan counts on the whole device. Injected
            by the server (the jobs package knows nothing of what else runs).
    """

    def __init__(self, db: Database, files: FileService, catalog: CatalogService,
                 settings: SchedulerSettings | None = None) -> None:
        self.db, self.files, self.blobs, self.catalog = db, files, files.blobs, catalog
        self.settings = settings or SchedulerSettings()
        self.node = _node_id()
        #: the lease owner's name: host (for people), node (see _node_id), pid, and a per-instance nonce
        self.name = f"{socket.gethostname()[:60]}:{self.node or '-'}:{os.getpid()}:{secrets.token_hex(3)}"
        self._last_beat = 0.0
        self.executor: Executor = self.settings.executor or LocalExecutor(
            self.settings.worker_module, self.settings.limits, self.settings.isolation)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.busy: Callable[[], bool] = lambda: False
        self._claiming = False
        #: drives the hyperparameter searches: their trials are jobs this scheduler runs like any other
        self.searches = SearchRunner(db, concurrency=self.settings.max_concurrent, wake=self.wake)

    # -- lifecycle ----------------------------------------------------------
    @property
    def isolation(self) -> str | None:
        """The level local workers run at (``APPLIANCE_WORKER_ISOLATION``); None for executors without one."""
        level = getattr(self.executor, "isolation", None)
        return level.value if isinstance(level, IsolationLevel) else None

    def start(self) -> None:
        self.recover()
        if self.isolation not in (None, IsolationLevel.SANDBOX.value):
            # A weaker level than the default is the administrator's choice: on the record at every start.
            with self.db.transaction() as s:
                record(s, SYSTEM, "worker.isolation.weakened", resource_type="scheduler", resource_id=self.name,
                       details={"level": self.isolation, "default": IsolationLevel.SANDBOX.value,
                                "setting": "APPLIANCE_WORKER_ISOLATION"})
            log.warning("training workers run below the default isolation",
                        extra={"level": self.isolation, "setting": "APPLIANCE_WORKER_ISOLATION"})
        if (self.isolation is not None and self.executor.name == "local"  # a Ray rank checks on its own node
                and (problem := isolation_problem(IsolationLevel(self.isolation)))):
            # Said at start-up, not first when a job fails: every job will fail closed until it is fixed.
            log.error("training workers cannot be isolated as configured; jobs will fail until this is fixed",
                      extra={"level": self.isolation, "problem": problem})
        if swept := sweep_orphaned_tmpdirs():
            log.warning("removed worker directories left by a killed control plane", extra={"count": len(swept)})
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="job-scheduler", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop claiming; kill running workers (their jobs become failed-resumable)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.worker.kill()
        for run in runs:
            run.thread.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        self.executor.close()

    def recover(self) -> int:
        """Fail, resumable, the running jobs whose scheduler is gone; return how many.

        A scheduler is gone when its lease expired, or when it was a process on
        this node (same boot and pid namespace) that no longer exists. Jobs of
        live schedulers, here or on other replicas, are left alone. Runs at
        start and then every ``lease_s / 6`` seconds.
        """
        now = utcnow()
        with self.db.transaction() as s:
            owners = s.execute(select(FineTuningJob.id, FineTuningJob.worker)
                               .where(FineTuningJob.status == "running", FineTuningJob.search.is_(None))).all()
            gone = [and_(FineTuningJob.id == job_id, FineTuningJob.worker == owner)
                    for job_id, owner in owners if _owner_exited(owner, self.node)]
            # The lock re-checks the conditions on the newest row: a lease renewed, or a
            # job finished, meanwhile is not taken; SKIP LOCKED leaves rows another
            # scheduler is recovering or finishing to it.
            stale = list(s.scalars(
                select(FineTuningJob).where(
                    FineTuningJob.status == "running", FineTuningJob.search.is_(None),  # a search has no worker
                    or_(FineTuningJob.lease_expires_at.is_(None), FineTuningJob.lease_expires_at <= now, *gone))
                .order_by(FineTuningJob.id).with_for_update(skip_locked=True)))
            for job in stale:
                log.warning("taking over a job whose scheduler is gone",
                            extra={"job_id": job.id, "owner": job.worker})
                self._fail(s, job, RESUMABLE_LOST, resumable=True)
        return len(stale)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def holds_device(self) -> bool:
        """Whether this scheduler's workers hold the device, or it is claiming a job for it."""
        return self._claiming or bool(self.running())

    # -- loop ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # keep scheduling; the failure is logged for operators
                log.exception("scheduler tick failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        if time.monotonic() - self._last_beat >= self.settings.lease_s / 6:
            self._last_beat = time.monotonic()
            self._renew_leases()
            self.recover()
        self.searches.tick()  # before promoting: a trial it creates is queued and claimed in this same tick
        self._promote_validated()
        self._forward_cancellations()
        with self._lock:
            free = self.settings.max_concurrent - len(self._runs)
        if free <= 0:
            return
        # Said before looking at what else holds the device, which looks at this in turn before it takes
        # the device: of two looking at once, at least one holds back (and looks again within poll_s).
        self._claiming = True
        try:
            if self.busy():
                return
            for _ in range(free):
                claimed = self._claim()
                if claimed is None:
                    break
                self._launch(*claimed)
        finally:
            self._claiming = False

    def _renew_leases(self) -> None:
        """Extend the lease of every job this scheduler runs; kill the workers of jobs it lost."""
        with self._lock:
            runs = [run for run in self._runs.values() if not run.lost]
        for run in runs:
            now = utcnow()
            with self.db.transaction() as s:
                # Never wait: a row locked by this scheduler's own _finish, a cancel or
                # another scheduler's recovery is renewed (or found lost) next beat.
                row = s.execute(select(FineTuningJob.status, FineTuningJob.worker, FineTuningJob.attempts)
                                .where(FineTuningJob.id == run.job_id).with_for_update(skip_locked=True)).first()
                if row is None and s.get(FineTuningJob, run.job_id) is not None:
                    continue
                if row is not None and tuple(row) == ("running", self.name, run.attempt):
                    s.execute(update(FineTuningJob).where(FineTuningJob.id == run.job_id)
                              .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=self.settings.lease_s))
                              .execution_options(synchronize_session=False))
                    continue
            if not run.ending:  # while ending, the job is left running only until _finish records it
                log.warning("lost the lease of a running job; stopping its worker",
                            extra={"job_id": run.job_id, "attempt": run.attempt})
                run.lost = True
                run.worker.kill()

    def _promote_validated(self) -> None:
        with self.db.transaction() as s:
            # Two schedulers promoting at once: each job is queued (and audited) once.
            for job in s.scalars(select(FineTuningJob).where(FineTuningJob.status == "validating_files")
                                 .with_for_update(skip_locked=True)):
                missing = [(field, fid) for field, fid in (
                    ("training_file", job.training_file), ("validation_file", job.validation_file),
                    ("class_images_file", job.class_images_file)) if fid and not self.files.is_live(s, fid)]
                if missing:
                    self._fail(s, job, {"code": "invalid_file", "param": missing[0][0],
                                        "message": f"file {missing[0][1]} is no longer available"}, resumable=False)
                    continue
                job.status = "queued"
                add_event(s, job.id, "Files validated, job queued")
                record(s, SYSTEM, "job.queue", resource_type="fine_tuning_job", resource_id=job.id,
                       project=project_name(s, job.project_id))
                if job.search is not None:  # the driver ran before this promotion: tick again at once, not in poll_s
                    self._wake.set()

    def _claim(self) -> tuple[str, int] | None:
        """Take the oldest queued job under this scheduler's lease; return its id and attempt number.

        PostgreSQL locks the row and skips rows other schedulers are claiming, so
        concurrent claims take different jobs and never wait on each other. SQLite
        has no row locks (``FOR UPDATE`` renders as nothing): there the writer
        transaction's ``BEGIN IMMEDIATE`` already excludes every other claimer.
        """
        now = utcnow()
        with self.db.transaction() as s:
            # A search job trains nothing itself: the search driver runs it, its trials are ordinary jobs.
            job = s.scalar(select(FineTuningJob).where(FineTuningJob.status == "queued", FineTuningJob.search.is_(None))
                           .order_by(FineTuningJob.created_at, FineTuningJob.id).limit(1)
                           .with_for_update(skip_locked=True))
            if job is None:
                return None
            job.status, job.worker, job.attempts = "running", self.name, job.attempts + 1
            job.started_at = job.heartbeat_at = now
            job.lease_expires_at = now + timedelta(seconds=self.settings.lease_s)
            add_event(s, job.id, f"Fine-tuning job started (attempt {job.attempts})")
            record(s, SYSTEM, "job.start", resource_type="fine_tuning_job", resource_id=job.id,
                   project=project_name(s, job.project_id),
                   details={"attempt": job.attempts, "worker": self.name, "isolation": self.isolation})
            return job.id, job.attempts

    def _forward_cancellations(self) -> None:
        with self._lock:
            runs = dict(self._runs)
        if not runs:
            return
        with self.db.read() as s:
            wanted = set(s.scalars(select(FineTuningJob.id).where(
                FineTuningJob.id.in_(list(runs)), FineTuningJob.cancel_requested.is_(True))))
        now = time.monotonic()
        for job_id in wanted:
            run = runs[job_id]
            if run.stop_sent_at is None:
                run.stop_sent_at = now
                try:
                    run.worker.send({"type": "stop"})
                except OSError:
                    pass
            elif now - run.stop_sent_at > self.settings.cancel_grace_s:
                run.worker.kill()

    # -- one run ------------------------------------------------------------
    def _start_message(self, job_id: str) -> tuple[dict[str, Any], Opener | None]:
        with self.db.read() as s:
            job = s.get(FineTuningJob, job_id)
            project = project_by_id(s, job.project_id)
            base = self.catalog.base_model_in(s, job.model)
            datasets = self.files.dataset_keys(s, [(role, fid) for role, fid in (
                ("train", job.training_file), ("validation", job.validation_file),
                ("class", job.class_images_file)) if fid])
            checkpoint = s.scalar(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                                  .order_by(JobCheckpoint.step_number.desc()).limit(1))
            # Decrypted chunk by chunk as it streams to the worker (once per Ray rank).
            resume = self.blobs.opener(s, checkpoint.object_id) if checkpoint else None
            # Image jobs are scored with the store's evaluators (CLIP-I/CLIP-T, DINO) when there are any.
            evaluators = ({family: ref.to_dict() for family, ref in self.catalog.evaluators_in(s).items()}
                          if base.kind == "diffusion" else {})
            memorization = dict(job.memorization or {})
            if memorization.get("extraction_probe") and base.kind == "llm":
                memorization["probe_targets"] = self.files.allowed_findings(
                    s, job.training_file, memorization["probe_samples"], job.seed)
        start = {
            "type": "start", "job_id": job.id, "project": project.name, "method_type": job.method_type,
            "hyperparameters": job.hyperparameters, "seed": job.seed, "model_dir": base.path,
            "model_kind": base.kind, "datasets": datasets, "compute": job.compute or {},
            "resume_step": checkpoint.step_number if checkpoint else None, "memorization": memorization,
            "isolation": self.isolation, "evaluators": evaluators,
            # a search trial reports its validation loss after every epoch, for its search's pruner
            "validate_every_epoch": job.search_id is not None,
        }
        return start, resume

    def _launch(self, job_id: str, attempt: int) -> None:
        try:
            start, resume = self._start_message(job_id)
            reads = [start["model_dir"], *(e["path"] for e in start["evaluators"].values()),
                     *(d["path"] for d in start["datasets"])]
            worker = self.executor.launch(job_id, start["compute"], reads)
        except Exception as exc:
            log.exception("could not start a worker", extra={"job_id": job_id})
            # A sandbox that cannot be built says what is missing (its message holds no data); anything
            # else is named by its type only, since its message might quote a path or a value.
            error = ({"code": "worker_sandbox_unavailable", "message": f"could not start the worker: {exc}",
                      "param": None} if isinstance(exc, SandboxUnavailable) else
                     {"code": "worker_start_failed", "message": f"could not start the worker: {type(exc).__name__}",
                      "param": None})
            with self.db.transaction() as s:
                job = self._owned(s, job_id, attempt)
                if job is not None:
                    self._fail(s, job, error, resumable=True)
            return
        run = _Run(job_id, attempt, worker)
        run.thread = threading.Thread(target=self._supervise, args=(run, start, resume),
                                      name=f"job-{job_id}", daemon=True)
        with self._lock:
            self._runs[job_id] = run
        run.thread.start()

    def _owned(self, s, job_id: str, attempt: int) -> FineTuningJob | None:
        """The job, row-locked, if this scheduler still holds the lease of ``attempt``; else None."""
        job = s.get(FineTuningJob, job_id, with_for_update=True)
        if job is None or job.status != "running" or job.worker != self.name or job.attempts != attempt:
            return None
        return job

    def _supervise(self, run: _Run, start: dict[str, Any], resume: Opener | None) -> None:
        job_id, worker = run.job_id, run.worker
        outcome: tuple[str, dict[str, Any]] | None = None
        inbox = _Inbox(project=start["project"])
        try:
            try:
                worker.start(start, resume)
            except OSError:
                raise  # the worker is gone already: recorded as lost
            except Exception as exc:  # the checkpoint to resume from cannot be read (shredded, tampered)
                log.exception("could not start the worker", extra={"job_id": job_id})
                worker.kill()
                outcome = ("error", {"code": "worker_start_failed", "param": None,
                                     "message": f"could not start the worker: {type(exc).__name__}"})
            del start["datasets"], resume  # drop the data keys from memory as soon as they are sent
            while outcome is None and not run.lost:
                try:
                    frame = worker.read(timeout=1.0)
                    if frame is None:
                        if not worker.alive():
                            break
                    elif not run.lost:
                        outcome = self._handle(job_id, frame, inbox)
                except (StreamError, FrameError) as exc:
                    log.warning("a worker's stream broke", extra={"job_id": job_id, "error": str(exc)[:300]})
                    worker.kill()  # it no longer speaks the protocol: nothing more it says can be trusted
                    outcome = ("error", {"code": "transfer_failed", "param": None,
                                         "message": f"an artefact from the worker did not arrive intact ({exc}); "
                                                    "nothing of it was stored; resume the job to continue "
                                                    "from its last checkpoint"})
        except Exception:
            log.exception("supervising the worker failed", extra={"job_id": job_id})
        finally:
            run.ending = True
            worker.reap()
            try:
                self._finish(run, outcome, inbox)
            except Exception:
                log.exception("recording the end of a job failed", extra={"job_id": job_id})
            inbox.discard()
            worker.cleanup()
            with self._lock:
                if self._runs.get(job_id) is run:
                    del self._runs[job_id]
            self._wake.set()

    def _handle(self, job_id: str, frame: tuple[dict[str, Any], bytes],
                inbox: _Inbox) -> tuple[str, dict[str, Any]] | None:
        header, payload = frame
        kind = header.get("type")
        if kind == "event":
            data = header.get("data")
            if header.get("event_type") == "isolation" and isinstance(data, dict) and "rank" in data:
                inbox.ranks.append({k: data.get(k) for k in ("rank", "level", "network")})
            remaining = _remaining(inbox, data) if header.get("event_type") == "metrics" and isinstance(data, dict) \
                else None
            with self.db.transaction() as s:
                add_event(s, job_id, str(header.get("message", ""))[:2000], level=header.get("level", "info"),
                          type=header.get("event_type", "message"), data=header.get("data"))
                if remaining is not None:  # OpenAI's estimated_finish: when the training steps will be done
                    s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                              .values(estimated_finish=utcnow() + timedelta(seconds=remaining)))
            return None
        if kind == "chunk":
            inbox.streams.chunk(payload)
            return None
        if kind == "begin":
            inbox.streams.begin(header, self._artefact_sink(job_id, header, inbox))
            return None
        if kind == "end":
            incoming = inbox.streams.end(header)
            try:
                self._store_artefact(job_id, incoming, inbox)
            except BaseException:
                incoming.abort()
                raise
            return None
        if kind in ("result", "cancelled", "error"):
            if inbox.streams.abandon() is not None and kind == "result":
                raise StreamError("the worker reported its result with an artefact still streaming")
            return kind, header
        log.warning("unknown frame from worker", extra={"job_id": job_id, "frame_type": kind})
        return None

    def _artefact_sink(self, job_id: str, header: dict[str, Any], inbox: _Inbox) -> BlobWriter | AdapterArchive:
        """Where an artefact beginning to stream in is written, encrypted, as its chunks arrive."""
        what = header.get("kind")
        if what == "checkpoint":
            return self.blobs.create(f"ftckpt-{secrets.token_hex(12)}", inbox.project, "checkpoint")
        if what == "result_file":
            return self.blobs.create(new_file_id(), inbox.project, "file")
        if what == "artifact":
            if inbox.archive is None:
                inbox.archive = self.catalog.adapter_archive(job_id, inbox.project)
            try:
                inbox.archive.begin(str(header.get("name")), header.get("size"))
            except ValueError as exc:
                raise StreamError(str(exc)) from None
            return inbox.archive
        raise StreamError(f"the worker began an artefact of unknown kind {what!r}")

    def _store_artefact(self, job_id: str, incoming: Incoming, inbox: _Inbox) -> None:
        """Record an artefact that arrived whole (its blob is aborted by the caller if this fails)."""
        header = incoming.begin
        if incoming.kind == "artifact":
            inbox.archive.end()
        elif incoming.kind == "checkpoint":
            self._store_checkpoint(job_id, int(header["step"]), header.get("metrics") or {}, incoming.sink)
        else:
            self._store_result_file(job_id, str(header.get("name")), incoming)

    def _store_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], writer: BlobWriter) -> None:
        key_row = writer.finish()
        with self.db.transaction() as s:
            s.add(key_row)
            s.add(JobCheckpoint(id=writer.object_id, job_id=job_id, step_number=step, object_id=writer.object_id,
                                metrics={"step": step, **metrics}))
            add_event(s, job_id, f"Checkpoint saved at step {step}", type="checkpoint",
                      data={"step": step, **metrics})

    def _store_result_file(self, job_id: str, name: str, incoming: Incoming) -> None:
        """An evaluation grid or validation image: stored encrypted as a file of the job's project."""
        import re

        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "result.bin"
        writer: BlobWriter = incoming.sink
        file_id = writer.object_id
        key_row = writer.finish()
        with self.db.transaction() as s:
            job = s.get(FineTuningJob, job_id)
            project = project_name(s, job.project_id)
            s.add(key_row)
            self.files.add_result_file(s, file_id=file_id, project_id=job.project_id,
                                       filename=f"{job_id}-{safe}", size=incoming.received, sha256=incoming.sha256,
                                       created_by=job.created_by, generated_by=job_id)
            job.result_files = [*(job.result_files or []), file_id]
            add_event(s, job_id, f"Result file {safe} stored as {file_id}", data={"file": file_id})
            record(s, SYSTEM, "file.result", resource_type="file", resource_id=file_id, project=project,
                   details={"job_id": job_id, "name": safe, "bytes": incoming.received})

    def _finish(self, run: _Run, outcome: tuple[str, dict[str, Any]] | None, inbox: _Inbox) -> None:
        job_id, worker = run.job_id, run.worker
        published: str | None = None
        with self.db.transaction() as s:
            # Locking the job first keeps the lock order of every job transaction (job row,
            # then the audit head), so this never deadlocks with a cancel on PostgreSQL.
            job = self._owned(s, job_id, run.attempt)
            if job is None:
                log.warning("a job's attempt ended after its lease was taken over; its outcome is dropped",
                            extra={"job_id": job_id, "attempt": run.attempt})
                return
            job.lease_expires_at = None
            kind, header = outcome if outcome else ("lost", {})
            if kind == "result":
                published = self._succeed(s, job, header, inbox.archive or {}, ranks=inbox.ranks)
            elif kind == "cancelled" or (kind == "lost" and job.cancel_requested):
                job.status, job.finished_at, job.resumable = "cancelled", utcnow(), True
                job.estimated_finish = None
                add_event(s, job.id, "Job cancelled")
                record(s, SYSTEM, "job.cancelled", resource_type="fine_tuning_job", resource_id=job.id,
                       project=project_name(s, job.project_id), details={"step": header.get("step")})
            elif kind == "error":
                error = {"code": header.get("code", "worker_error"), "message": header.get("message", ""),
                         "param": header.get("param")}
                if header.get("trace"):
                    log.error("worker failed", extra={"job_id": job_id, "trace": header["trace"]})
                self._fail(s, job, error, resumable=error["code"] in RESUMABLE_ERRORS)
            else:
                self._fail(s, job, dict(RESUMABLE_LOST, message=RESUMABLE_LOST["message"] + worker.exit_detail()),
                           resumable=True)
        if published:
            inbox.archive = None  # published and committed: no longer the run's to discard
            for hook in self.catalog.on_publish:
                try:
                    hook(published)
                except Exception:
                    log.exception("adapter publish hook failed", extra={"adapter": published})

    def _succeed(self, s, job: FineTuningJob, header: dict[str, Any],
                 artefacts: AdapterArchive | dict[str, bytes], ranks: list[dict[str, Any]] | None = None) -> str:
        # The privacy evidence says how the worker was shut in (the manifest signs it, the report shows it);
        # under Ray, also where each rank's worker ran, as the ranks reported it.
        isolation = {"level": self.isolation or "none", "executor": self.executor.name}
        if ranks:
            isolation["ranks"] = sorted(ranks, key=lambda r: r.get("rank") or 0)
        header = {**header, "privacy": {**(header.get("privacy") or {}), "worker_isolation": isolation}}
        adapter_id = self.catalog.publish_from_job(
            s, SYSTEM, job_id=job.id, project_id=job.project_id, base_model=job.model, method=job.method_type,
            suffix=job.suffix, trained_by=job.created_by,
            datasets=self.files.lineage(s, [fid for fid in (job.training_file, job.validation_file,
                                                            job.class_images_file) if fid]),
            hyperparameters=header.get("resolved") or job.hyperparameters, metrics=header.get("metrics") or {},
            seed=job.seed, privacy=header.get("privacy") or {}, files=artefacts)
        project = project_name(s, job.project_id)
        job.status, job.finished_at, job.fine_tuned_model = "succeeded", utcnow(), adapter_id
        job.estimated_finish = None
        job.trained_tokens = header.get("trained_tokens")
        job.metrics = header.get("metrics") or {}
        job.privacy = header.get("privacy") or {}
        job.resolved = header.get("resolved") or {}
        memory = (header.get("details") or {}).get("memory")
        if memory and "plan" in memory:  # the worker's plan, made on its device with the data, beside what it measured
            job.compute = {**(job.compute or {}), "plan": {**memory["plan"], "made": "by the worker, on its device",
                                                           **{k: v for k, v in memory.items() if k != "plan"}}}
        elif memory:  # image jobs: the plan made at creation stays, the measured peak goes beside it
            job.compute = {**(job.compute or {}), "measured": dict(memory)}
        job.resumable = False
        add_event(s, job.id, f"New fine-tuned model created: {adapter_id}", data=job.metrics)
        add_event(s, job.id, "The job has successfully completed")
        record(s, SYSTEM, "job.succeed", resource_type="fine_tuning_job", resource_id=job.id, project=project,
               details={"fine_tuned_model": adapter_id, "trained_tokens": job.trained_tokens,
                        "metrics": job.metrics, "privacy": job.privacy})
        return adapter_id

    def _fail(self, s, job: FineTuningJob, error: dict[str, Any], *, resumable: bool) -> None:
        job.status, job.error, job.finished_at, job.resumable = "failed", error, utcnow(), resumable
        job.estimated_finish = None
        job.lease_expires_at = None
        add_event(s, job.id, f"Job failed: {error['message']}", level="error")
        record(s, SYSTEM, "job.fail", outcome="failure", resource_type="fine_tuning_job", resource_id=job.id,
               project=project_name(s, job.project_id), reason=error["code"], details={"resumable": resumable})


def _node_id() -> str | None:
    """What schedulers that can see each other's processes share: this boot and pid namespace.

    None where that cannot be told (no /proc); such schedulers rely on leases alone.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot}/{pid_namespace}".encode()).hexdigest()[:12]


def _owner_exited(owner: str | None, node: str | None) -> bool:
    """Whether the scheduler named ``owner`` certainly stopped: a process of this node that no longer exists."""
    parts = (owner or "").rsplit(":", 3)
    if node is None or len(parts) != 4 or parts[1] != node or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False  # another scheduler of this process; its lease tells
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
