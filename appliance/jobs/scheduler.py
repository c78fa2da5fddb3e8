"""The job queue: claims jobs, runs each in an isolated worker, records what it reports.

One scheduler runs inside the server process. It claims queued jobs with a
conditional update (so a second scheduler never runs a job twice), starts a
worker per job through its executor (a sandboxed process on this host, or a
Ray job: :mod:`appliance.jobs.executors`; one job per device by default),
hands it the job and its datasets' data keys, and stores events, encrypted
checkpoints and the final adapter. A worker that dies, or a server that was
killed, leaves the job ``failed`` with a resumable error, never ``running``.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update

from appliance import __version__
from appliance.audit.service import AuditContext, record
from appliance.catalog.models import BaseModelRecord
from appliance.catalog.service import CatalogService
from appliance.crypto.envelope import WrappedKey
from appliance.db.base import Database, utcnow
from appliance.files.models import StoredFile
from appliance.identity.models import Project
from appliance.jobs.executors import Executor, LocalExecutor, Worker
from appliance.jobs.models import FineTuningJob, JobCheckpoint
from appliance.jobs.sandbox import WorkerLimits
from appliance.jobs.service import add_event
from appliance.storage.blobs import BlobStore, key_context
from appliance.storage.models import DataKey

log = logging.getLogger("appliance.jobs")

SYSTEM = AuditContext(actor="system:scheduler", auth_method="internal", origin_ip="local")
RESUMABLE_LOST = {
    "code": "worker_lost",
    "message": "the training worker stopped unexpectedly (killed or the server restarted); "
               "resume the job to continue from its last checkpoint",
    "param": None,
}


@dataclass
class SchedulerSettings:
    max_concurrent: int = 1
    poll_s: float = 0.5
    cancel_grace_s: float = 10.0
    worker_module: str = "appliance.jobs.worker"
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    isolate_network: bool = True
    #: Where workers run; None: sandboxed local processes from the three fields above.
    executor: Executor | None = None


@dataclass
class _Run:
    job_id: str
    worker: Worker
    thread: threading.Thread
    stop_sent_at: float | None = None


class Scheduler:
    """Runs queued jobs in sandboxed workers.

    Args:
        db: The database.
        blobs: Encrypted storage (datasets in, checkpoints and adapters out).
        catalog: Base models and adapter publishing.
        settings: Concurrency, polling and worker limits.
    """

    def __init__(self, db: Database, blobs: BlobStore, catalog: CatalogService,
                 settings: SchedulerSettings | None = None) -> None:
        self.db, self.blobs, self.catalog = db, blobs, catalog
        self.settings = settings or SchedulerSettings()
        self.executor: Executor = self.settings.executor or LocalExecutor(
            self.settings.worker_module, self.settings.limits, self.settings.isolate_network)
        self.name = f"scheduler-{os.getpid()}-{secrets.token_hex(3)}"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self.recover()
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
        """Mark jobs left ``running`` by a dead process as failed, resumable."""
        with self.db.transaction() as s:
            stuck = list(s.scalars(select(FineTuningJob).where(FineTuningJob.status == "running")))
            for job in stuck:
                self._fail(s, job, RESUMABLE_LOST, resumable=True)
        return len(stuck)

    def running(self) -> list[str]:
        with self._lock:
            return list(self._runs)

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
        self._promote_validated()
        self._forward_cancellations()
        with self._lock:
            free = self.settings.max_concurrent - len(self._runs)
        for _ in range(max(0, free)):
            job_id = self._claim()
            if job_id is None:
                break
            self._launch(job_id)

    def _promote_validated(self) -> None:
        with self.db.transaction() as s:
            for job in s.scalars(select(FineTuningJob).where(FineTuningJob.status == "validating_files")):
                missing = [fid for fid in (job.training_file, job.validation_file) if fid and not _file_ok(s, fid)]
                if missing:
                    self._fail(s, job, {"code": "invalid_file", "param": "training_file",
                                        "message": f"file {missing[0]} is no longer available"}, resumable=False)
                    continue
                job.status = "queued"
                add_event(s, job.id, "Files validated, job queued")
                record(s, SYSTEM, "job.queue", resource_type="fine_tuning_job", resource_id=job.id,
                       project=_project_name(s, job))

    def _claim(self) -> str | None:
        with self.db.transaction() as s:
            candidate = s.scalar(select(FineTuningJob.id).where(FineTuningJob.status == "queued")
                                 .order_by(FineTuningJob.created_at).limit(1))
            if candidate is None:
                return None
            claimed = s.execute(
                update(FineTuningJob).where(FineTuningJob.id == candidate, FineTuningJob.status == "queued")
                .values(status="running", worker=self.name, started_at=utcnow(), heartbeat_at=utcnow(),
                        attempts=FineTuningJob.attempts + 1)
            ).rowcount
            if claimed != 1:
                return None
            job = s.get(FineTuningJob, candidate)
            add_event(s, job.id, f"Fine-tuning job started (attempt {job.attempts})")
            record(s, SYSTEM, "job.start", resource_type="fine_tuning_job", resource_id=job.id,
                   project=_project_name(s, job), details={"attempt": job.attempts, "worker": self.name})
            return candidate

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
    def _start_message(self, job_id: str) -> tuple[dict[str, Any], bytes]:
        with self.db.read() as s:
            job = s.get(FineTuningJob, job_id)
            project = s.get(Project, job.project_id)
            base = s.scalar(select(BaseModelRecord).where(BaseModelRecord.name == job.model))
            datasets = []
            for role, fid in (("train", job.training_file), ("validation", job.validation_file)):
                if not fid:
                    continue
                key_row = s.get(DataKey, fid)
                data_key = self.blobs.keys.unwrap(WrappedKey(key_row.kek_id, key_row.wrapped),
                                                  key_context(fid, key_row.project))
                datasets.append({"role": role, "object_id": fid, "project": key_row.project,
                                 "path": str(self.blobs.path_of(fid)), "key": base64.b64encode(data_key).decode()})
            checkpoint = s.scalar(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                                  .order_by(JobCheckpoint.step_number.desc()).limit(1))
            resume = b"".join(self.blobs.read(s, checkpoint.object_id)) if checkpoint else b""
        start = {
            "type": "start", "job_id": job.id, "project": project.name, "method_type": job.method_type,
            "hyperparameters": job.hyperparameters, "seed": job.seed, "model_dir": base.path,
            "model_kind": base.kind, "datasets": datasets, "compute": job.compute or {},
            "resume_step": checkpoint.step_number if checkpoint else None,
        }
        return start, resume

    def _launch(self, job_id: str) -> None:
        try:
            start, resume = self._start_message(job_id)
            worker = self.executor.launch(job_id, start["compute"])
        except Exception as exc:
            log.exception("could not start a worker", extra={"job_id": job_id})
            with self.db.transaction() as s:
                self._fail(s, s.get(FineTuningJob, job_id),
                           {"code": "worker_start_failed", "message": f"could not start the worker: "
                            f"{type(exc).__name__}", "param": None}, resumable=True)
            return
        thread = threading.Thread(target=self._supervise, args=(job_id, worker, start, resume),
                                  name=f"job-{job_id}", daemon=True)
        with self._lock:
            self._runs[job_id] = _Run(job_id, worker, thread)
        thread.start()

    def _supervise(self, job_id: str, worker: Worker, start: dict[str, Any], resume: bytes) -> None:
        outcome: tuple[str, dict[str, Any]] | None = None
        artefacts: dict[str, bytes] = {}
        try:
            worker.send(start, resume)
            del start["datasets"]  # drop the data keys from memory as soon as they are sent
            last_beat = 0.0
            while outcome is None:
                frame = worker.read(timeout=1.0)
                if frame is None:
                    if not worker.alive():
                        break
                else:
                    outcome = self._handle(job_id, frame, artefacts)
                if time.monotonic() - last_beat > 5:
                    last_beat = time.monotonic()
                    with self.db.transaction() as s:
                        s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                                  .values(heartbeat_at=utcnow()))
        except Exception:
            log.exception("supervising the worker failed", extra={"job_id": job_id})
        finally:
            worker.reap()
            try:
                self._finish(job_id, outcome, artefacts, worker)
            except Exception:
                log.exception("recording the end of a job failed", extra={"job_id": job_id})
            worker.cleanup()
            with self._lock:
                self._runs.pop(job_id, None)
            self._wake.set()

    def _handle(self, job_id: str, frame: tuple[dict[str, Any], bytes],
                artefacts: dict[str, bytes]) -> tuple[str, dict[str, Any]] | None:
        header, payload = frame
        kind = header.get("type")
        if kind == "event":
            with self.db.transaction() as s:
                add_event(s, job_id, str(header.get("message", ""))[:2000], level=header.get("level", "info"),
                          type=header.get("event_type", "message"), data=header.get("data"))
            return None
        if kind == "checkpoint":
            self._store_checkpoint(job_id, int(header["step"]), header.get("metrics") or {}, payload)
            return None
        if kind == "artifact":
            artefacts[str(header["name"])] = payload
            return None
        if kind == "result_file":
            self._store_result_file(job_id, str(header["name"]), payload)
            return None
        if kind in ("result", "cancelled", "error"):
            return kind, header
        log.warning("unknown frame from worker", extra={"job_id": job_id, "frame_type": kind})
        return None

    def _store_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], payload: bytes) -> None:
        ckpt_id = f"ftckpt-{secrets.token_hex(12)}"
        with self.db.read() as s:
            project = _project_name(s, s.get(FineTuningJob, job_id))
        with self.blobs.writing(ckpt_id, project, "checkpoint") as writer:
            writer.write(payload)
            key_row = writer.finish()
            try:
                with self.db.transaction() as s:
                    s.add(key_row)
                    s.add(JobCheckpoint(id=ckpt_id, job_id=job_id, step_number=step, object_id=ckpt_id,
                                        metrics={"step": step, **metrics}))
                    add_event(s, job_id, f"Checkpoint saved at step {step}", type="checkpoint",
                              data={"step": step, **metrics})
            except BaseException:
                writer.abort()
                raise

    def _store_result_file(self, job_id: str, name: str, payload: bytes) -> None:
        """An evaluation grid or validation image: stored encrypted as a file of the job's project."""
        import hashlib
        import re

        from appliance.files.service import new_file_id

        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "result.bin"
        file_id = new_file_id()
        with self.db.read() as s:
            job = s.get(FineTuningJob, job_id)
            project = _project_name(s, job)
        with self.blobs.writing(file_id, project, "file") as writer:
            writer.write(payload)
            key_row = writer.finish()
            try:
                with self.db.transaction() as s:
                    job = s.get(FineTuningJob, job_id)
                    s.add(key_row)
                    s.add(StoredFile(
                        id=file_id, project_id=job.project_id, filename=f"{job_id}-{safe}", purpose="fine-tune-results",
                        bytes=len(payload), original_bytes=len(payload), records=0, status="processed",
                        created_by=job.created_by, content_sha256=hashlib.sha256(payload).hexdigest(),
                        policy_hash="", decision="accepted", scan_summary={"generated_by": job_id},
                    ))
                    job.result_files = [*(job.result_files or []), file_id]
                    add_event(s, job_id, f"Result file {safe} stored as {file_id}", data={"file": file_id})
                    record(s, SYSTEM, "file.result", resource_type="file", resource_id=file_id, project=project,
                           details={"job_id": job_id, "name": safe, "bytes": len(payload)})
            except BaseException:
                writer.abort()
                raise

    def _finish(self, job_id: str, outcome: tuple[str, dict[str, Any]] | None, artefacts: dict[str, bytes],
                worker: Worker) -> None:
        published: str | None = None
        with self.db.transaction() as s:
            job = s.get(FineTuningJob, job_id)
            if job.status != "running":
                return
            kind, header = outcome if outcome else ("lost", {})
            if kind == "result":
                published = self._succeed(s, job, header, artefacts)
            elif kind == "cancelled" or (kind == "lost" and job.cancel_requested):
                job.status, job.finished_at, job.resumable = "cancelled", utcnow(), True
                add_event(s, job.id, "Job cancelled")
                record(s, SYSTEM, "job.cancelled", resource_type="fine_tuning_job", resource_id=job.id,
                       project=_project_name(s, job), details={"step": header.get("step")})
            elif kind == "error":
                error = {"code": header.get("code", "worker_error"), "message": header.get("message", ""),
                         "param": header.get("param")}
                if header.get("trace"):
                    log.error("worker failed", extra={"job_id": job_id, "trace": header["trace"]})
                self._fail(s, job, error, resumable=error["code"] == "worker_error")
            else:
                self._fail(s, job, dict(RESUMABLE_LOST, message=RESUMABLE_LOST["message"] + worker.exit_detail()),
                           resumable=True)
        if published:
            for hook in self.catalog.on_publish:
                try:
                    hook(published)
                except Exception:
                    log.exception("adapter publish hook failed", extra={"adapter": published})

    def _succeed(self, s, job: FineTuningJob, header: dict[str, Any], artefacts: dict[str, bytes]) -> str:
        project = s.get(Project, job.project_id)
        base = s.scalar(select(BaseModelRecord).where(BaseModelRecord.name == job.model))
        adapter_id = ":".join(["ft", job.model, project.name, job.suffix or "", job.id])
        files = {fid: s.get(StoredFile, fid) for fid in (job.training_file, job.validation_file) if fid}
        manifest = {
            "format": "appliance-adapter-manifest/1",
            "job_id": job.id, "project": project.name, "trained_by": job.created_by,
            "method": job.method_type, "base_model": {"name": base.name, "content_hash": base.content_hash},
            "datasets": [{"id": f.id, "sha256": f.content_sha256, "policy_hash": f.policy_hash,
                          "records": f.records} for f in files.values()],
            "hyperparameters": header.get("resolved") or job.hyperparameters,
            "metrics": header.get("metrics") or {}, "seed": job.seed,
            "code_version": __version__, "created_at": utcnow().isoformat(),
        }
        self.catalog.publish(s, SYSTEM, adapter_id=adapter_id, job_id=job.id, project=project, base_model=base.name,
                             kind=job.method_type, files=artefacts, manifest=manifest)
        job.status, job.finished_at, job.fine_tuned_model = "succeeded", utcnow(), adapter_id
        job.trained_tokens = header.get("trained_tokens")
        job.metrics = header.get("metrics") or {}
        job.resolved = header.get("resolved") or {}
        job.resumable = False
        add_event(s, job.id, f"New fine-tuned model created: {adapter_id}", data=job.metrics)
        add_event(s, job.id, "The job has successfully completed")
        record(s, SYSTEM, "job.succeed", resource_type="fine_tuning_job", resource_id=job.id, project=project.name,
               details={"fine_tuned_model": adapter_id, "trained_tokens": job.trained_tokens,
                        "metrics": job.metrics})
        return adapter_id

    def _fail(self, s, job: FineTuningJob, error: dict[str, Any], *, resumable: bool) -> None:
        job.status, job.error, job.finished_at, job.resumable = "failed", error, utcnow(), resumable
        add_event(s, job.id, f"Job failed: {error['message']}", level="error")
        record(s, SYSTEM, "job.fail", outcome="failure", resource_type="fine_tuning_job", resource_id=job.id,
               project=_project_name(s, job), reason=error["code"], details={"resumable": resumable})


def _file_ok(s, file_id: str) -> bool:
    row = s.get(StoredFile, file_id)
    return row is not None and row.deleted_at is None


def _project_name(s, job: FineTuningJob) -> str:
    return s.get(Project, job.project_id).name
