"""HTTP routes of ``/v1/evaluations``: create, list, retrieve, cancel."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from appliance.evaluations.schemas import (
    EvaluationCreate,
    EvaluationError,
    EvaluationList,
    EvaluationObject,
    EvaluationProgress,
    Fidelity,
    ImageSettings,
    ModelResult,
)
from appliance.evaluations.service import EvaluationService, EvaluationView
from appliance.files.service import FileService
from appliance.identity.roles import Permission
from appliance.web.context import audit_context
from appliance.web.openapi import error_responses
from serving.bodies import documented_body


def _ts(dt) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def evaluation_object(view: EvaluationView) -> EvaluationObject:
    r = view.row
    return EvaluationObject(
        id=r.id, created_at=_ts(r.created_at), status=r.status, file=r.file, models=list(r.models),
        base_model=r.base_model, kind=r.kind, samples=r.samples, max_tokens=r.max_tokens,
        images=ImageSettings(**r.images) if r.images else None,
        fidelity=Fidelity(**r.fidelity) if r.fidelity else None,
        results=[ModelResult(**m) for m in r.results or []], project=view.project,
        started_at=_ts(r.started_at), finished_at=_ts(r.finished_at),
        error=EvaluationError(**r.error) if r.error else None, result_file=r.result_file,
        result_erased_at=_ts(r.result_erased_at), result_erased_reason=r.result_erased_reason,
        progress=EvaluationProgress(**r.progress) if r.progress and r.status == "running" else None,
    )


class EvaluationController(Controller):
    path = "/v1/evaluations"
    tags = ["evaluations"]

    @post(opt={"permission": Permission.JOBS_WRITE}, status_code=200, sync_to_thread=True,
          dto=documented_body(EvaluationCreate), return_dto=None)
    def create(self, request: Request, evaluations: NamedDependency[EvaluationService],
               files: NamedDependency[FileService], data: JSONBody[dict[str, Any]]) -> EvaluationObject:
        """Evaluate 1-4 models (a base model, its fine-tunes) on a test file: loss, perplexity, exact match and
        token F1 per text model, CLIP-T per image model (with a CLIP evaluator imported); the generations
        (answers or images) of `samples` prompts side by side in an encrypted result file."""
        project = files.resolve_project(request.user, request.headers.get("openai-project"))
        return evaluation_object(evaluations.create(request.user, audit_context(request), project, data))

    @get(opt={"permission": Permission.JOBS_READ}, sync_to_thread=True)
    def list_evaluations(self, request: Request, evaluations: NamedDependency[EvaluationService],
                         after: FromQuery[str | None] = None,
                         limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20) -> EvaluationList:
        views, has_more = evaluations.list(request.user, after=after, limit=limit)
        data = [evaluation_object(v) for v in views]
        return EvaluationList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                              last_id=data[-1].id if data else None)

    @get("/{evaluation_id:str}", opt={"permission": Permission.JOBS_READ}, sync_to_thread=True)
    def retrieve(self, request: Request, evaluations: NamedDependency[EvaluationService],
                 evaluation_id: FromPath[str]) -> EvaluationObject:
        return evaluation_object(evaluations.get(request.user, evaluation_id))

    @post("/{evaluation_id:str}/cancel", opt={"permission": Permission.JOBS_WRITE}, status_code=200,
          responses=error_responses(409), sync_to_thread=True)
    def cancel(self, request: Request, evaluations: NamedDependency[EvaluationService],
               evaluation_id: FromPath[str]) -> EvaluationObject:
        return evaluation_object(evaluations.cancel(request.user, audit_context(request), evaluation_id))
