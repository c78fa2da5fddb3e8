"""Fine-tuning jobs as the API sees them: create, list, retrieve, cancel, resume, events, checkpoints."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from appliance.audit.service import AuditContext, record
from appliance.catalog.service import CatalogService
from appliance.db.base import Database, utcnow
from appliance.errors import (
    MODEL_NAME_LIKE,
    ROLE_LIKE,
    ApplianceError,
    ConflictError,
    CrossProjectDenied,
    InvalidFieldsError,
    InvalidRequestError,
    NotFoundError,
    echo,
)
from appliance.files.service import FileService
from appliance.identity.service import Principal, project_by_id, project_names
from appliance.jobs.memorization import fit_canaries, parse_memorization, public_view, training_examples
from appliance.jobs.models import TERMINAL, FineTuningJob, JobCheckpoint, JobEvent
from appliance.jobs.planning import (
    image_plan_or_problem,
    plan_or_problem,
    recommendation,
    starting_points,
    training_device,
)
from appliance.jobs.recipes import DATASET_PURPOSE, capabilities, validate_method
from appliance.jobs.search import budget_message, largest, parse_search_method, stored
from appliance.jobs.schemas import SUFFIX_EXPECTED, SUFFIX_PATTERN
from appliance.training.data import holdout_size
from appliance.training.hyperparameters import SHARDING
from appliance.training.planner import Device

if TYPE_CHECKING:
    from appliance.identity.models import Project
    from appliance.jobs.executors import Executor

ACTIVE = frozenset({"validating_files", "queued", "running"})
#: The image methods that take uploaded class images (prior preservation).
CLASS_IMAGE_METHODS = ("dreambooth", "dreambooth_lora")
_SUFFIX_RE = re.compile(f"^{SUFFIX_PATTERN}$")


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


@dataclass(frozen=True)
class Phase:
    """A post-training phase under way (canary exposure, the extraction probe): its items done of its total."""

    name: str
    done: int
    total: int
    seconds_left: int | None = None

    @classmethod
    def of(cls, data: Any) -> Phase | None:
        """The phase an event's data reports, if it is still under way (a finished one is no longer shown)."""
        if not isinstance(data, dict):
            return None
        name, done, total, left = data.get("name"), data.get("done"), data.get("total"), data.get("seconds_left")
        if not isinstance(name, str) or not isinstance(done, int) or not isinstance(total, int) or not done < total:
            return None
        return cls(name, done, total, left if isinstance(left, int) else None)


class Progress(NamedTuple):
    """A job's latest progress report: the optimizer step of the total, and a post-training phase under way."""

    step: int
    total: int
    phase: Phase | None = None


@dataclass(frozen=True)
class JobView:
    row: FineTuningJob
    project: str


#: Below this many validation examples a job warns that its validation figures are noisy.
SMALL_VALIDATION = 20


def add_event(s, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, level=level, type=type, data=data)
    s.add(event)
    return event



def unfinished_job_using(s: Session, file_id: str) -> str | None:
    """The id of a job that has not finished and reads ``file_id`` (training, validation or class images), if any.

    Registered on :attr:`appliance.files.service.FileService.users_of`: a file in use is not re-scanned.
    """
    return s.scalar(select(FineTuningJob.id).where(
        or_(FineTuningJob.training_file == file_id, FineTuningJob.validation_file == file_id,
            FineTuningJob.class_images_file == file_id),
        FineTuningJob.status.notin_(TERMINAL)).limit(1))

def erase_job_results_with(files: FileService) -> Callable[[Session, AuditContext, str], None]:
    """The hook that crypto-shreds the result files of the jobs that read a file being shredded.

    Registered on :attr:`appliance.files.service.FileService.on_shred` (it runs in the transaction that deletes
    the file: a user's deletion or retention). A job's result files copy what it read: its sample generations
    hold validation prompts and references, its validation images come from its instance images; they go with
    the training, validation or class-image file they came from, each audited ``file.delete`` naming the job.
    """

    def erase(s: Session, ctx: AuditContext, file_id: str) -> None:
        jobs = s.scalars(select(FineTuningJob).where(
            or_(FineTuningJob.training_file == file_id, FineTuningJob.validation_file == file_id,
                FineTuningJob.class_images_file == file_id)).order_by(FineTuningJob.id))
        for job in jobs:
            for result in job.result_files or []:
                files.shred_live(s, ctx, result, reason=f"job result: the file {file_id} it was made from was "
                                                         "deleted", details={"job_id": job.id, "erased_with":
                                                                             {"file": file_id}})

    return erase


def request_cancel(s: Session, ctx: AuditContext, job: FineTuningJob, project: str, *,
                   reason: str | None = None) -> None:
    """Cancel ``job`` (row-locked by the caller, not yet ended), audited in ``s``: a running one is told to
    stop (the scheduler forwards it to the worker), any other ends at once.

    Args:
        reason: Why the system cancels it (``pruned``, ``max_seconds``); None when a person asked.
    """
    why = f" ({reason})" if reason else ""
    if job.status == "running" and job.search is None:
        job.cancel_requested = True
        add_event(s, job.id, "Cancellation requested" + why)
    elif job.status == "running":  # a search: its driver cancels its trials, then the search ends
        job.cancel_requested = True
        add_event(s, job.id, "Cancellation requested: running trials are cancelled, no further trial starts")
    else:
        job.status, job.finished_at, job.resumable = "cancelled", utcnow(), False
        add_event(s, job.id, "Job cancelled" + why)
    details: dict[str, Any] = {"status": job.status}
    if job.search_id is not None:
        details |= {"search_id": job.search_id, "trial": job.trial_number}
    record(s, ctx, "job.cancel", resource_type="fine_tuning_job", resource_id=job.id, project=project,
           reason=reason, details=details)


class JobService:
    """Validates requests and moves jobs through their states; the scheduler runs them.

    Args:
        db: The database.
        catalog: Base models (for ``model``).
        wake: Called after a change the scheduler should act on at once.
        executor: Where the scheduler runs workers (bounds ``compute.workers``); None: one local worker.
    """

    def __init__(self, db: Database, catalog: CatalogService, files: FileService,
                 wake: Callable[[], None] = lambda: None, executor: Executor | None = None,
                 training_device: Callable[[], Device] = training_device) -> None:
        self.db, self.catalog, self.files, self.wake = db, catalog, files, wake
        self.executor_name = executor.name if executor else "local"
        self.max_workers = executor.max_workers if executor else 1
        self.training_device = training_device

    # -- create -------------------------------------------------------------
    def _class_images(self, s, principal: Principal, project: Project, body: dict[str, Any], base: Any,
                      method_type: str | None, hyperparameters: dict[str, Any]) -> Any:
        """The uploaded class images of a DreamBooth job with prior preservation, checked like its training file."""
        file_id = body["class_images_file"]
        if not isinstance(file_id, str) or not file_id:
            raise InvalidRequestError(f"`class_images_file` must be a file id; got {file_id!r}",
                                      param="class_images_file")
        if base is None or method_type is None:
            raise InvalidRequestError("`class_images_file` needs a valid image base model and method first",
                                      param="class_images_file")
        if base.kind != "diffusion" or method_type not in CLASS_IMAGE_METHODS:
            raise InvalidRequestError(
                f"`class_images_file` is for DreamBooth image jobs ({', '.join(CLASS_IMAGE_METHODS)}) with prior "
                f"preservation; this job's method is {method_type!r}", param="class_images_file")
        if not hyperparameters.get("class_prompt"):
            raise InvalidRequestError(
                f"`class_images_file` needs `method.{method_type}.hyperparameters.class_prompt`: the prompt the class "
                "images are trained with (setting it turns prior preservation on)", param="class_images_file")
        if file_id == body.get("training_file"):
            raise InvalidRequestError("`class_images_file` must be another dataset than `training_file`: class "
                                      "images show the class in general, not the subject", param="class_images_file")
        return self.files.trainable_file(s, principal, project, file_id, "class_images_file",
                                         DATASET_PURPOSE["diffusion"])

    def create(self, principal: Principal, ctx: AuditContext, project: Project, body: dict[str, Any]) -> JobView:
        """Validate everything the request (a :class:`~appliance.jobs.schemas.JobCreate`) names, then create
        the job in ``validating_files``.

        Every field is checked, so that every problem is reported at once: one problem is answered as
        itself (a 404 for an unknown model or file), several as one 400 that lists them all, ``param``
        naming the first. A file of another project is always answered alone, as not found (and audited).
        """
        problems = _Problems()
        base = None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            problems.add(InvalidRequestError("`model` is required: the name of a base model", param="model"))
        else:
            with problems.collect():
                base = self.catalog.get_base_model(model)
        method = body.get("method")
        if method is None and body.get("hyperparameters") is not None:
            # OpenAI's older top-level form means supervised fine-tuning: LoRA here.
            method = {"type": "lora", "lora": {"hyperparameters": body["hyperparameters"]}}
        if method is None:
            method = {"type": "lora"}
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            problems.add(InvalidRequestError(f"`seed` must be an integer in [0, 2^31); got {seed!r}", param="seed"))
            seed = None
        explicit = _method_seed(method)
        if seed is None:
            seed = explicit if isinstance(explicit, int) else secrets.randbelow(2**31)
        method_type, hyperparameters, memorization, compute = None, {}, {}, {}
        search, searched_at_most, search_failed = None, {}, False
        if body.get("search") is not None and base is not None:
            if base.kind != "llm":
                problems.add(InvalidRequestError(
                    "`search` varies the hyperparameters of language-model jobs (lora, qlora); image jobs take "
                    "fixed values: remove `search` and give each hyperparameter one value", param="search"))
            else:
                with problems.collect():  # the trials' template: the fixed values, validated as a job's below
                    search, method = parse_search_method(method, body["search"])
                    searched_at_most = largest(search)
                # with the space refused, the method's ranges would only be reported again as bad values
                search_failed = search is None
        if base is not None and not search_failed:
            with problems.collect():
                method_type, hyperparameters = validate_method(method, base_kind=base.kind, seed=seed)
            with problems.collect():
                memorization = parse_memorization(body.get("memorization"), base_kind=base.kind)
            with problems.collect():
                compute = validate_compute(body.get("compute"), base_kind=base.kind, executor=self.executor_name,
                                           max_workers=self.max_workers, method=method_type or "lora")
            if compute.get("workers", 1) > 1 and hyperparameters.get("dp") is not None:
                problems.add(InvalidRequestError(
                    f"differentially private training (`dp`) runs in one worker; got `compute.workers` "
                    f"{compute['workers']}", param="compute.workers"))
            if base.kind == "llm" and method_type is not None and not problems.errors:
                with problems.collect():  # a job that cannot fit is refused now, not an hour in
                    # a search's plan takes each searched dimension's largest rank and batch: every trial fits
                    plan = plan_or_problem(base.path, method_type, {**hyperparameters, **searched_at_most}, compute,
                                           self.training_device(), max_workers=self.max_workers)
                    if plan is not None:
                        compute = {**compute, "plan": plan}
            if base.kind == "diffusion" and method_type is not None and not problems.errors:
                with problems.collect():  # the memory options chosen, or the job refused naming what would fit
                    plan = image_plan_or_problem(base.path, method_type, hyperparameters, self.training_device(),
                                                 evaluator_params=self.catalog.largest_evaluator_parameters())
                    if plan is not None:
                        compute = {**compute, "plan": plan}
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX_RE.match(suffix)):
            problems.add(InvalidRequestError(f"`suffix` must be {SUFFIX_EXPECTED}; got {suffix!r}", param="suffix"))
        if body.get("training_file") is None:
            problems.add(InvalidRequestError("`training_file` is required: the id of an uploaded, scanned file",
                                             param="training_file"))
        purpose = DATASET_PURPOSE[base.kind] if base is not None else None
        # The quality report's leakage check of the pair decrypts and compares two sketches (up to ~54 MB each):
        # done before the writer's lock is taken; the transaction below checks the files again.
        leak = None
        if body.get("training_file") is not None and body.get("validation_file") and base is not None \
                and base.kind == "llm" and not problems.errors:
            try:
                with self.db.read() as s:
                    pair = [self.files.trainable_file(s, principal, project, body[f], f, purpose)
                            for f in ("training_file", "validation_file")]
                    leak = self.files.leakage_between(s, *pair)
            except ApplianceError:  # reported below, naming the field
                leak = None
        with self.db.transaction() as s:
            training = validation = None
            if body.get("training_file") is not None:
                with problems.collect():
                    training = self.files.trainable_file(s, principal, project, body["training_file"], "training_file",
                                                purpose)
            if body.get("validation_file"):
                if base is not None and base.kind != "llm":
                    problems.add(InvalidRequestError("image jobs take no `validation_file`: fidelity is measured "
                                                     "against the instance images", param="validation_file"))
                else:
                    with problems.collect():
                        validation = self.files.trainable_file(s, principal, project, body["validation_file"],
                                                      "validation_file", purpose)
            class_images = None
            if body.get("class_images_file") is not None:
                with problems.collect():
                    class_images = self._class_images(s, principal, project, body, base, method_type,
                                                      hyperparameters)
            if memorization.get("canaries") and training is not None:
                with problems.collect():  # canaries must not outweigh the data
                    memorization = fit_canaries(memorization, training_examples(training.records, validation
                                                                                is not None), body.get("memorization"))
            problems.raise_if_any()
            if memorization.get("canaries"):
                from appliance.training.memorization import new_canaries

                memorization["canary_texts"] = new_canaries(memorization["canaries"])
            job = FineTuningJob(
                id=new_job_id(), project_id=project.id, created_by=principal.user, model=base.name,
                training_file=training.id, validation_file=validation.id if validation else None, suffix=suffix,
                class_images_file=class_images.id if class_images else None,
                seed=seed, method_type=method_type, hyperparameters=hyperparameters, status="validating_files",
                memorization=memorization, compute=compute, search=stored(search) if search else None,
            )
            s.add(job)
            s.flush()
            add_event(s, job.id, f"Created fine-tuning job: {job.id}")
            if search is not None:  # the budget, stated before the first trial starts
                add_event(s, job.id, budget_message(search), type="search", data={"search": search.to_dict()})
            add_event(s, job.id, "Validating training file: " + training.id)
            if base.kind == "llm":
                held = validation.records if validation is not None else holdout_size(training.records)
                if held < SMALL_VALIDATION:  # its loss swings with a single example: say so before the run
                    source = "the validation file holds" if validation is not None else "holding out 10% leaves"
                    add_event(s, job.id, f"Small validation set: {source} only {held} example{'s' * (held != 1)}, "
                              "so validation loss and perplexity are noisy; upload a validation file of at least "
                              f"{SMALL_VALIDATION} records for figures to rely on", level="warn", type="data",
                              data={"validation_examples": held, "recommended": SMALL_VALIDATION})
            if validation is not None and leak:
                if leak["exact"]["count"] or leak["near"]["count"]:  # the quality report's check of the pair
                    add_event(s, job.id, f"Leakage: {leak['advice']}", level="warn", type="data",
                              data={"leakage": {k: leak[k] for k in ("records", "exact", "near", "share")}})
            record(s, ctx, "job.create", resource_type="fine_tuning_job", resource_id=job.id, project=project.name,
                   details={"model": base.name, "method": method_type, "training_file": training.id,
                            "validation_file": job.validation_file, "class_images_file": job.class_images_file,
                            "hyperparameters": hyperparameters,
                            "seed": seed, "memorization": public_view(memorization), "compute": compute,
                            "search": search.to_dict() if search else None})
        self.wake()
        return JobView(job, project.name)

    # -- read ---------------------------------------------------------------
    def count(self, principal: Principal) -> int:
        """How many jobs the caller's project has; every project's for a global role."""
        with self.db.read() as s:
            stmt = select(func.count()).select_from(FineTuningJob)
            if principal.project_id is not None:
                stmt = stmt.where(FineTuningJob.project_id == principal.project_id)
            return s.scalar(stmt) or 0

    def _job(self, principal: Principal, job_id: str) -> JobView:
        with self.db.read() as s:
            row = s.get(FineTuningJob, job_id)
            project = project_by_id(s, row.project_id) if row else None
        if row is None:
            raise NotFoundError(f"fine-tuning job {job_id!r} not found", param="fine_tuning_job_id")
        principal.check_project(row.project_id, resource=f"fine-tuning job {job_id!r}")
        return JobView(row, project.name)

    def get(self, principal: Principal, job_id: str) -> JobView:
        return self._job(principal, job_id)

    def list(self, principal: Principal, *, after: str | None, limit: int,
             trials: bool = True) -> tuple[list[JobView], bool]:
        """The jobs ``principal`` sees, newest first; ``trials=False`` leaves search trials out (:meth:`trials_of`)."""
        with self.db.read() as s:
            stmt = select(FineTuningJob)
            if principal.project_id is not None:
                stmt = stmt.where(FineTuningJob.project_id == principal.project_id)
            if not trials:
                stmt = stmt.where(FineTuningJob.search_id.is_(None))
            if after:
                anchor = s.get(FineTuningJob, after)
                if anchor is not None:
                    stmt = stmt.where((FineTuningJob.created_at < anchor.created_at) | (
                        (FineTuningJob.created_at == anchor.created_at) & (FineTuningJob.id < anchor.id)))
            rows = list(s.scalars(stmt.order_by(FineTuningJob.created_at.desc(), FineTuningJob.id.desc())
                                  .limit(limit + 1)))
            names = project_names(s, {r.project_id for r in rows})
        return [JobView(r, names[r.project_id]) for r in rows[:limit]], len(rows) > limit

    def trials_of(self, searches: list[JobView]) -> dict[str, list[JobView]]:
        """The trials of each search in ``searches`` (views the caller may see), in trial order; one query."""
        ids = [v.row.id for v in searches if v.row.search is not None]
        if not ids:
            return {}
        project = {v.row.id: v.project for v in searches}
        with self.db.read() as s:
            rows = s.scalars(select(FineTuningJob).where(FineTuningJob.search_id.in_(ids))
                             .order_by(FineTuningJob.trial_number, FineTuningJob.id))
            out: dict[str, list[JobView]] = {}
            for row in rows:
                out.setdefault(row.search_id, []).append(JobView(row, project[row.search_id]))
        return out

    def starting_points(self, model_dir: str, kind: str) -> tuple[list[dict[str, Any]], str | None]:
        """What jobs with ``"auto"`` settings on this base would need on this appliance's training device, per
        method, and the method the job form suggests with its reason (:func:`appliance.jobs.planning.starting_points`)."""
        points = starting_points(model_dir, kind, self.training_device(), max_workers=self.max_workers)
        return points, recommendation(points, kind)

    def progress(self, job_ids: list[str]) -> dict[str, Progress]:
        """Each job's latest progress report: the step of its total and, after training, the post-training
        phase under way (jobs without a report are left out).

        For lists: one query for all the jobs, whose visibility the caller has already checked.
        """
        if not job_ids:
            return {}
        with self.db.read() as s:
            latest = (select(func.max(JobEvent.id)).where(JobEvent.job_id.in_(job_ids), JobEvent.type == "metrics")
                      .group_by(JobEvent.job_id))
            rows = s.scalars(select(JobEvent).where(JobEvent.id.in_(latest)))
            out = {}
            for e in rows:
                data = e.data or {}
                step, total = data.get("step"), data.get("total_steps")
                if isinstance(step, int) and isinstance(total, int) and total > 0:
                    out[e.job_id] = Progress(step, total, Phase.of(data.get("phase")))
        return out

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
            request_cancel(s, ctx, job, view.project)
        self.wake()
        return self._job(principal, job_id)

    def resume(self, principal: Principal, ctx: AuditContext, job_id: str) -> JobView:
        """Put a failed (resumable) or cancelled job back in the queue; it continues from its last checkpoint."""
        view = self._job(principal, job_id)
        with self.db.transaction() as s:
            # Locked: on PostgreSQL a scheduler may be claiming or finishing the job meanwhile.
            job = s.get(FineTuningJob, job_id, with_for_update=True)
            if job.search is not None or job.search_id is not None:
                raise ConflictError(f"job {job_id} is a hyperparameter search" + (
                    "" if job.search is not None else f" trial (of {job.search_id})") + "; a search does not resume: "
                    "create a new search job", param="fine_tuning_job_id")
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


class _Problems:
    """The problems found in one request, answered together by :meth:`raise_if_any`."""

    def __init__(self) -> None:
        self.errors: list[ApplianceError] = []

    def add(self, error: ApplianceError) -> None:
        self.errors.append(error)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Note the request's problem raised in the block and carry on (other failures propagate)."""
        try:
            yield
        except (InvalidRequestError, NotFoundError) as exc:
            self.errors.append(exc)

    def raise_if_any(self) -> None:
        """One problem as itself; several as one :class:`InvalidFieldsError` listing each, field by field.

        A file of another project is answered alone, as not found, so that the denial is audited.
        """
        if not self.errors:
            return
        denied = [e for e in self.errors if isinstance(e, CrossProjectDenied)]
        if denied or len(self.errors) == 1:
            raise (denied or self.errors)[0]
        problems: list[tuple[str, str]] = []
        for error in self.errors:
            if isinstance(error, InvalidFieldsError):
                problems += error.problems
            else:
                problems.append((error.param or "body", error.message))
        raise InvalidFieldsError(problems)


def _method_seed(method: Any) -> Any:
    if not isinstance(method, dict):
        return None
    kind = method.get("type", "lora")
    body = method.get(kind) if isinstance(kind, str) else None
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
