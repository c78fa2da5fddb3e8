"""Fine-tuning jobs as the API sees them: create, list, retrieve, cancel, resume, events, checkpoints."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from appliance.audit.service import AuditContext, record
from appliance.catalog.service import CatalogService
from appliance.db.base import Database, utcnow
from appliance.errors import (
    MODEL_NAME_LIKE,
    ROLE_LIKE,
    ConflictError,
    CrossProjectDenied,
    InvalidRequestError,
    NotFoundError,
    echo,
)
from appliance.files.models import StoredFile
from appliance.identity.models import Project
from appliance.identity.service import Principal
from appliance.jobs.memorization import parse_memorization, public_view
from appliance.jobs.models import TERMINAL, FineTuningJob, JobCheckpoint, JobEvent
from appliance.jobs.recipes import DATASET_PURPOSE, capabilities, validate_method
from appliance.training.hyperparameters import SHARDING

if TYPE_CHECKING:
    from appliance.jobs.executors import Executor

ACTIVE = frozenset({"validating_files", "queued", "running"})
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class JobView:
    row: FineTuningJob
    project: str


def add_event(s, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, level=level, type=type, data=data)
    s.add(event)
    return event


class JobService:
    """Validates requests and moves jobs through their states; the scheduler runs them.

    Args:
        db: The database.
        catalog: Base models (for ``model``).
        wake: Called after a change the scheduler should act on at once.
        executor: Where the scheduler runs workers (bounds ``compute.workers``); None: one local worker.
    """

    def __init__(self, db: Database, catalog: CatalogService, wake: Callable[[], None] = lambda: None,
                 executor: Executor | None = None) -> None:
        self.db, self.catalog, self.wake = db, catalog, wake
        self.executor_name = executor.name if executor else "local"
        self.max_workers = executor.max_workers if executor else 1

    # -- create -------------------------------------------------------------
    def _check_file(self, s, principal: Principal, project: Project, file_id: str | None, param: str,
                    purpose: str = "fine-tune") -> StoredFile:
        row = s.get(StoredFile, file_id) if file_id else None
        if row is not None and row.deleted_at is None and principal.project_id not in (None, row.project_id):
            raise CrossProjectDenied(f"file {file_id!r} not found in project {project.name!r}", param=param)
        if row is None or row.deleted_at is not None or row.project_id != project.id:
            raise NotFoundError(f"file {file_id!r} not found in project {project.name!r}", param=param)
        if row.purpose != purpose:
            raise InvalidRequestError(f"file {file_id!r} has purpose {row.purpose!r}; this model trains on "
                                      f"{purpose!r} files", param=param)
        if row.status != "processed" or row.decision != "accepted":
            raise InvalidRequestError(f"file {file_id!r} has not passed scanning (status {row.status!r})",
                                      param=param)
        return row

    def create(self, principal: Principal, ctx: AuditContext, project: Project, body: dict[str, Any]) -> JobView:
        """Validate everything the request names, then create the job in ``validating_files``."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("`model` is required: the name of a base model", param="model")
        base = self.catalog.get_base_model(model)
        method = body.get("method")
        if method is None and body.get("hyperparameters") is not None:
            # OpenAI's older top-level form means supervised fine-tuning: LoRA here.
            method = {"type": "lora", "lora": {"hyperparameters": body["hyperparameters"]}}
        if method is None:
            method = {"type": "lora"}
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            raise InvalidRequestError(f"`seed` must be an integer in [0, 2^31); got {seed!r}", param="seed")
        explicit = _method_seed(method)
        if seed is None:
            seed = explicit if isinstance(explicit, int) else secrets.randbelow(2**31)
        method_type, hyperparameters = validate_method(method, base_kind=base.kind, seed=seed)
        memorization = parse_memorization(body.get("memorization"), base_kind=base.kind)
        if memorization.get("canaries"):
            from appliance.training.memorization import new_canaries

            memorization["canary_texts"] = new_canaries(memorization["canaries"])
        compute = validate_compute(body.get("compute"), base_kind=base.kind, executor=self.executor_name,
                                   max_workers=self.max_workers, method=method_type)
        if compute.get("workers", 1) > 1 and hyperparameters.get("dp") is not None:
            raise InvalidRequestError(
                f"differentially private training (`dp`) runs in one worker; got `compute.workers` "
                f"{compute['workers']}", param="compute.workers")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX_RE.match(suffix)):
            raise InvalidRequestError(f"`suffix` must be 1-64 characters of letters, digits, '.', '_' or '-'; "
                                      f"got {suffix!r}", param="suffix")
        with self.db.transaction() as s:
            purpose = DATASET_PURPOSE[base.kind]
            training = self._check_file(s, principal, project, body.get("training_file"), "training_file", purpose)
            validation = None
            if body.get("validation_file"):
                if base.kind != "llm":
                    raise InvalidRequestError("image jobs take no `validation_file`: fidelity is measured against "
                                              "the instance images", param="validation_file")
                validation = self._check_file(s, principal, project, body["validation_file"], "validation_file",
                                              purpose)
            job = FineTuningJob(
                id=new_job_id(), project_id=project.id, created_by=principal.user, model=base.name,
                training_file=training.id, validation_file=validation.id if validation else None, suffix=suffix,
                seed=seed, method_type=method_type, hyperparameters=hyperparameters, status="validating_files",
                memorization=memorization, compute=compute,
            )
            s.add(job)
            s.flush()
            add_event(s, job.id, f"Created fine-tuning job: {job.id}")
            add_event(s, job.id, "Validating training file: " + training.id)
            record(s, ctx, "job.create", resource_type="fine_tuning_job", resource_id=job.id, project=project.name,
                   details={"model": base.name, "method": method_type, "training_file": training.id,
                            "validation_file": job.validation_file, "hyperparameters": hyperparameters,
                            "seed": seed, "memorization": public_view(memorization), "compute": compute})
        self.wake()
        return JobView(job, project.name)

    # -- read ---------------------------------------------------------------
    def _job(self, principal: Principal, job_id: str) -> JobView:
        with self.db.read() as s:
            row = s.get(FineTuningJob, job_id)
            project = s.get(Project, row.project_id) if row else None
        if row is None:
            raise NotFoundError(f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id")
        principal.check_project(row.project_id, resource=f"fine-tuning job {job_id!r}")
        return JobView(row, project.name)

    def get(self, principal: Principal, job_id: str) -> JobView:
        return self._job(principal, job_id)

    def list(self, principal: Principal, *, after: str | None, limit: int) -> tuple[list[JobView], bool]:
        with self.db.read() as s:
            stmt = select(FineTuningJob, Project.name).join(Project, Project.id == FineTuningJob.project_id)
            if principal.project_id is not None:
                stmt = stmt.where(FineTuningJob.project_id == principal.project_id)
            if after:
                anchor = s.get(FineTuningJob, after)
                if anchor is not None:
                    stmt = stmt.where((FineTuningJob.created_at < anchor.created_at) | (
                        (FineTuningJob.created_at == anchor.created_at) & (FineTuningJob.id < anchor.id)))
            rows = s.execute(stmt.order_by(FineTuningJob.created_at.desc(), FineTuningJob.id.desc())
                             .limit(limit + 1)).all()
        return [JobView(r, p) for r, p in rows[:limit]], len(rows) > limit

    def events(self, principal: Principal, job_id: str, *, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
        self._job(principal, job_id)
        with self.db.read() as s:
            stmt = select(JobEvent).where(JobEvent.job_id == job_id)
            if after:
                stmt = stmt.where(JobEvent.id < _event_pk(after))
            rows = list(s.scalars(stmt.order_by(JobEvent.id.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def checkpoints(self, principal: Principal, job_id: str, *, after: str | None,
                    limit: int) -> tuple[JobView, list[JobCheckpoint], bool]:
        view = self._job(principal, job_id)
        with self.db.read() as s:
            stmt = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
            if after:
                anchor = s.get(JobCheckpoint, after)
                if anchor is not None:
                    stmt = stmt.where(JobCheckpoint.step_number < anchor.step_number)
            rows = list(s.scalars(stmt.order_by(JobCheckpoint.step_number.desc()).limit(limit + 1)))
        return view, rows[:limit], len(rows) > limit

    # -- control ------------------------------------------------------------
    def cancel(self, principal: Principal, ctx: AuditContext, job_id: str) -> JobView:
        """Queued jobs stop at once; running ones are told to stop and end within seconds."""
        view = self._job(principal, job_id)
        with self.db.transaction() as s:
            # Locked: on PostgreSQL a scheduler may be claiming or finishing the job meanwhile.
            job = s.get(FineTuningJob, job_id, with_for_update=True)
            if job.status in TERMINAL:
                raise ConflictError(f"job {job_id} is already {job.status}", param="fine_tuning_job_id")
            if job.status == "running":
                job.cancel_requested = True
                add_event(s, job.id, "Cancellation requested")
            else:
                job.status, job.finished_at, job.resumable = "cancelled", utcnow(), False
                add_event(s, job.id, "Job cancelled")
            record(s, ctx, "job.cancel", resource_type="fine_tuning_job", resource_id=job_id, project=view.project,
                   details={"status": job.status})
        self.wake()
        return self._job(principal, job_id)

    def resume(self, principal: Principal, ctx: AuditContext, job_id: str) -> JobView:
        """Put a failed (resumable) or cancelled job back in the queue; it continues from its last checkpoint."""
        view = self._job(principal, job_id)
        with self.db.transaction() as s:
            # Locked: on PostgreSQL a scheduler may be claiming or finishing the job meanwhile.
            job = s.get(FineTuningJob, job_id, with_for_update=True)
            if job.status not in ("failed", "cancelled") or (job.status == "failed" and not job.resumable):
                raise ConflictError(
                    f"job {job_id} is {job.status}" + (" and not resumable" if job.status == "failed" else "")
                    + "; only failed-resumable or cancelled jobs resume", param="fine_tuning_job_id")
            last = s.scalar(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                            .order_by(JobCheckpoint.step_number.desc()).limit(1))
            previous = job.status
            job.status, job.error, job.finished_at, job.cancel_requested = "queued", None, None, False
            add_event(s, job.id, f"Job resumed from step {last.step_number}" if last else
                      "Job resumed from the start (no checkpoint yet)")
            record(s, ctx, "job.resume", resource_type="fine_tuning_job", resource_id=job_id, project=view.project,
                   details={"from_status": previous, "from_step": last.step_number if last else 0})
        resumed = self._job(principal, job_id)  # as this call left it: the woken scheduler may claim it at once
        self.wake()
        return resumed


def validate_compute(
    compute: Any, *, base_kind: str, executor: str, max_workers: int, method: str = "lora"
) -> dict[str, Any]:
    """The job's ``compute`` as stored: ``{}`` for one worker, ``{"workers": n}`` for n data-parallel ones.

    ``sharding`` (several workers only) lays the base model out over them:
    ``none`` replicates it (DDP), ``fsdp`` shards it (methods that declare
    ``supports_fsdp``: LoRA), ``auto``
    (the default, not stored) shards when a copy per worker would not fit.
    Every problem is reported at once, each naming its field and the value received.
    """
    if compute is None:
        return {}
    if not isinstance(compute, dict):
        raise InvalidRequestError(f'`compute` must be an object such as {{"workers": 2}}; got {compute!r}',
                                  param="compute")
    problems = [(f"compute.{key}", f"`compute.{key}` is not a compute option (known: workers, sharding)")
                for key in sorted(set(compute) - {"workers", "sharding"})]
    workers = compute.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        problems.append(("compute.workers", f"`compute.workers` must be a positive integer; got {workers!r}"))
    elif workers > max_workers and executor == "local":
        problems.append(("compute.workers", f"`compute.workers` is {workers}, but this appliance runs each job in "
                         "one local worker (APPLIANCE_EXECUTOR=local); omit `compute`, or have the administrator "
                         "set APPLIANCE_EXECUTOR=ray"))
    elif workers > max_workers:
        problems.append(("compute.workers", f"`compute.workers` is {workers}; this appliance allows at most "
                         f"{max_workers} (APPLIANCE_RAY_MAX_WORKERS)"))
    elif workers > 1 and base_kind != "llm":
        problems.append(("compute.workers", f"`compute.workers` is {workers}, but image jobs train in one worker; "
                         "omit `compute`"))
    sharding = compute.get("sharding", "auto")
    if sharding not in SHARDING:
        problems.append(("compute.sharding", f"`compute.sharding` must be one of {', '.join(map(repr, SHARDING))}; "
                         f"got {echo(sharding, MODEL_NAME_LIKE)}"))
    elif sharding == "fsdp" and not _supports_fsdp(base_kind, method):
        problems.append(("compute.sharding", f"`compute.sharding` 'fsdp' shards LoRA jobs only; got method "
                         f"{echo(method, ROLE_LIKE)} (QLoRA's base model is already 4-bit)"))
    elif sharding == "fsdp" and isinstance(workers, int) and workers == 1:
        problems.append(("compute.sharding", "`compute.sharding` 'fsdp' needs several workers; got `compute.workers` 1"))
    if problems:
        raise InvalidRequestError("; ".join(m for _, m in problems), param=problems[0][0])
    if workers == 1:
        return {}
    return {"workers": workers} | ({"sharding": sharding} if sharding != "auto" else {})


def _supports_fsdp(base_kind: str, method: str) -> bool:
    declared = capabilities(base_kind, method)
    return declared is not None and declared.supports_fsdp


def _method_seed(method: Any) -> Any:
    if not isinstance(method, dict):
        return None
    body = method.get(method.get("type", "lora"))
    hp = body.get("hyperparameters") if isinstance(body, dict) else None
    return hp.get("seed") if isinstance(hp, dict) else None


def _event_pk(event_id: str) -> int:
    try:
        return int(event_id.removeprefix("ftevent-"), 16)
    except ValueError:
        raise InvalidRequestError(f"`after` must be an event id such as ftevent-1a; got {event_id!r}",
                                  param="after") from None


def event_id(pk: int) -> str:
    return f"ftevent-{pk:08x}"
