"""HTTP routes of ``/v1/fine_tuning/jobs`` (OpenAI's shapes, plus ``/resume``)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from appliance.files.service import FileService
from appliance.identity.roles import Permission
from appliance.jobs.memorization import public_view
from appliance.jobs.schemas import (
    CheckpointList,
    CheckpointObject,
    EventList,
    EventObject,
    JobError,
    JobCreate,
    JobList,
    JobObject,
)
from appliance.jobs.service import JobService, JobView, event_id
from appliance.web.context import audit_context
from appliance.web.openapi import error_responses
from serving.bodies import documented_body

#: OpenAI's top-level ``hyperparameters`` keys, echoed from the method's.
_OPENAI_HP = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _ts(dt) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def job_object(view: JobView) -> JobObject:
    r = view.row
    hp = dict(r.hyperparameters)
    shown = {**hp, **{k: v for k, v in (r.resolved or {}).items() if k in hp}}
    return JobObject(
        id=r.id, created_at=_ts(r.created_at), finished_at=_ts(r.finished_at), model=r.model,
        fine_tuned_model=r.fine_tuned_model, organization_id=view.project, status=r.status,
        error=JobError(**r.error) if r.error else None,
        hyperparameters={k: shown.get(k, "auto") for k in _OPENAI_HP},
        method={"type": r.method_type, r.method_type: {"hyperparameters": shown}},
        training_file=r.training_file, validation_file=r.validation_file, result_files=list(r.result_files or []),
        class_images_file=r.class_images_file,
        trained_tokens=r.trained_tokens, seed=r.seed, estimated_finish=_ts(r.estimated_finish),
        user_provided_suffix=r.suffix, metrics=r.metrics or {}, resumable=r.resumable, compute=r.compute or {},
        memorization=public_view(r.memorization), privacy=r.privacy or {}, search=_search_view(r),
    )


def _search_view(r) -> dict[str, Any] | None:
    """A search job's space, budget and trial table; a trial's search job and number; None for other jobs."""
    if r.search is not None:
        shown = {k: v for k, v in r.search.items() if k != "fixed"}  # the fixed values are the method's
        shown["trial_table"] = [{k: v for k, v in row.items() if k not in ("seen", "stopping")}
                                for row in r.search.get("trial_table") or []]
        return shown
    if r.search_id is not None:
        return {"search_id": r.search_id, "trial": r.trial_number}
    return None


class JobController(Controller):
    path = "/v1/fine_tuning/jobs"
    tags = ["fine-tuning"]

    @post(opt={"permission": Permission.JOBS_WRITE}, status_code=200, sync_to_thread=True,
          dto=documented_body(JobCreate), return_dto=None)
    def create(self, request: Request, jobs: NamedDependency[JobService], files: NamedDependency[FileService],
               data: JSONBody[dict[str, Any]]) -> JobObject:
        """Create a fine-tuning job: `model`, `training_file`, optional `validation_file`, `suffix`, `seed`,
        `method` `{"type": "lora" | "qlora", "<type>": {"hyperparameters": {...}}}`, and `compute`
        `{"workers": n}` for n data-parallel workers (Ray executor).

        Every problem of the body is reported at once (`param` names the first; the message lists each)."""
        project = files.resolve_project(request.user, request.headers.get("openai-project"))
        return job_object(jobs.create(request.user, audit_context(request), project, data))

    @get(opt={"permission": Permission.JOBS_READ}, sync_to_thread=True)
    def list_jobs(self, request: Request, jobs: NamedDependency[JobService], after: FromQuery[str | None] = None,
                  limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20) -> JobList:
        views, has_more = jobs.list(request.user, after=after, limit=limit)
        data = [job_object(v) for v in views]
        return JobList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)

    @get("/{job_id:str}", opt={"permission": Permission.JOBS_READ}, sync_to_thread=True)
    def retrieve(self, request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> JobObject:
        return job_object(jobs.get(request.user, job_id))

    @post("/{job_id:str}/cancel", opt={"permission": Permission.JOBS_WRITE}, status_code=200, responses=error_responses(409),
          sync_to_thread=True)
    def cancel(self, request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> JobObject:
        return job_object(jobs.cancel(request.user, audit_context(request), job_id))

    @post("/{job_id:str}/resume", opt={"permission": Permission.JOBS_WRITE}, status_code=200, responses=error_responses(409),
          sync_to_thread=True)
    def resume(self, request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> JobObject:
        """Continue a failed (resumable) or cancelled job from its last checkpoint."""
        return job_object(jobs.resume(request.user, audit_context(request), job_id))

    @get("/{job_id:str}/events", opt={"permission": Permission.JOBS_READ}, sync_to_thread=True)
    def events(self, request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str],
               after: FromQuery[str | None] = None,
               limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 20) -> EventList:
        rows, has_more = jobs.events(request.user, job_id, after=after, limit=limit)
        return EventList(data=[EventObject(id=event_id(e.id), created_at=_ts(e.created_at), level=e.level,
                                           message=e.message, type=e.type, data=e.data) for e in rows],
                         has_more=has_more)

    @get("/{job_id:str}/checkpoints", opt={"permission": Permission.JOBS_READ}, sync_to_thread=True)
    def checkpoints(self, request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str],
                    after: FromQuery[str | None] = None,
                    limit: Annotated[int, QueryParameter(ge=1, le=100)] = 10) -> CheckpointList:
        view, rows, has_more = jobs.checkpoints(request.user, job_id, after=after, limit=limit)
        base = f"ft:{view.row.model}:{view.project}:{view.row.suffix or ''}:{view.row.id}"
        data = [CheckpointObject(id=c.id, created_at=_ts(c.created_at),
                                 fine_tuned_model_checkpoint=f"{base}:ckpt-step-{c.step_number}",
                                 fine_tuning_job_id=c.job_id, step_number=c.step_number, metrics=c.metrics)
                for c in rows]
        return CheckpointList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                              last_id=data[-1].id if data else None)
