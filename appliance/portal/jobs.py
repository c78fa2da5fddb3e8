"""Fine-tuning: the job form with inline validation, the job list, and a live job page."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath
from litestar.response import Redirect, Template

from appliance.errors import CrossProjectDenied, InvalidRequestError
from appliance.files.service import FileService
from appliance.identity.roles import Permission
from appliance.jobs.models import JobEvent
from appliance.jobs.service import JobService
from appliance.portal.render import line_chart, page, percent, portal, session_of
from appliance.server.context import audit_context
from appliance.server.state import AppState

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]

#: Hyperparameters offered on the form, per method, with a hint each ("auto" by default).
FIELDS: dict[str, list[tuple[str, str]]] = {
    "common": [
        ("n_epochs", "passes over the data"), ("batch_size", "examples per step"),
        ("learning_rate", "e.g. 2e-4"), ("lora_r", "adapter rank, e.g. 16"), ("lora_alpha", "e.g. 32"),
        ("lora_dropout", "0 to 0.5"), ("max_seq_length", "tokens"), ("warmup_ratio", "0 to 0.5"),
        ("weight_decay", "e.g. 0.0"), ("gradient_accumulation_steps", "micro-batches per step"),
        ("checkpoint_every_steps", "0 = never"),
    ],
}
METHODS = {"lora": "LoRA", "qlora": "QLoRA (4-bit base)"}


def _number(value: str) -> Any:
    value = value.strip()
    if value in ("", "auto"):
        return None
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value  # let the validator name it


def _form_context(request: Request, files: FileService, appliance: AppState, values: dict[str, str],
                  errors: dict[str, str]) -> dict[str, Any]:
    principal = session_of(request).principal
    views, _ = files.list(principal, project=None, purpose="fine-tune", after=None, limit=500, order="desc")
    return {"models": [m for m in appliance.catalog.list_base_models() if m.kind == "llm"],
            "datasets": [v for v in views if v.row.decision == "accepted"], "methods": METHODS,
            "fields": FIELDS["common"], "values": values, "errors": errors}


@get("/jobs", opt=portal(Permission.JOBS_READ), include_in_schema=False, sync_to_thread=True)
def job_list(request: Request, jobs: NamedDependency[JobService]) -> Template:
    views, _ = jobs.list(session_of(request).principal, after=None, limit=100)
    return page(request, "jobs.html", section="jobs", title="Fine-tuning", jobs=views)


@get("/jobs/new", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def new_job(request: Request, files: NamedDependency[FileService], appliance: NamedDependency[AppState]) -> Template:
    return page(request, "job_new.html", section="jobs", title="New fine-tuning job",
                **_form_context(request, files, appliance, {"method": "lora"}, {}))


@post("/jobs", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def create_job(request: Request, jobs: NamedDependency[JobService], files: NamedDependency[FileService],
               appliance: NamedDependency[AppState], data: Form) -> Template | Redirect:
    """Validate with the same code as the API; show every problem next to its field."""
    principal = session_of(request).principal
    method = data.get("method", "lora")
    hyperparameters = {k: _number(data.get(k, "")) for k, _ in FIELDS["common"]}
    body: dict[str, Any] = {
        "model": data.get("model") or None, "training_file": data.get("training_file") or None,
        "validation_file": data.get("validation_file") or None, "suffix": data.get("suffix") or None,
        "method": {"type": method, method: {"hyperparameters": {k: v for k, v in hyperparameters.items()
                                                                 if v is not None}}},
    }
    try:
        training = files.get(principal, body["training_file"]) if body["training_file"] else None
        project = files.resolve_project(principal, training.project if training else None)
        view = jobs.create(principal, audit_context(request), project, body)
    except CrossProjectDenied:
        raise  # answered 404 and audited, like the API; never shown as a form problem
    except InvalidRequestError as exc:
        errors = _field_errors(exc)
        return page(request, "job_new.html", section="jobs", title="New fine-tuning job", status_code=400,
                    **_form_context(request, files, appliance, data, errors))
    except Exception as exc:  # not found and the like: shown against the form too
        if not hasattr(exc, "message"):
            raise
        return page(request, "job_new.html", section="jobs", title="New fine-tuning job", status_code=400,
                    **_form_context(request, files, appliance, data,
                                    {getattr(exc, "param", None) or "form": exc.message}))
    return Redirect(f"/jobs/{view.row.id}", status_code=303)


def _field_errors(exc: InvalidRequestError) -> dict[str, str]:
    """Map a validation error onto form fields (hyperparameter errors list every field)."""
    problems = getattr(exc, "problems", None)
    if problems:
        return {path.rsplit(".", 1)[-1]: text for path, text in problems}
    field = (exc.param or "form").rsplit(".", 1)[-1]
    return {field: exc.message}


def _progress(events: list[JobEvent]) -> dict[str, Any]:
    train, valid = [], []
    step = total = None
    for e in events:
        d = e.data or {}
        if e.type == "metrics":
            if d.get("train_loss") is not None:
                train.append((float(d["step"]), float(d["train_loss"])))
            if d.get("valid_loss") is not None:
                valid.append((float(d["step"]), float(d["valid_loss"])))
            step, total = d.get("step", step), d.get("total_steps", total)
    return {"chart": line_chart({"training loss": train, "validation loss": valid}),
            "step": step, "total": total, "percent": percent(step, total)}


@get("/jobs/{job_id:str}", opt=portal(Permission.JOBS_READ), include_in_schema=False, sync_to_thread=True)
def job_page(request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> Template:
    principal = session_of(request).principal
    view = jobs.get(principal, job_id)
    events, _ = jobs.events(principal, job_id, after=None, limit=1000)
    _, checkpoints, _ = jobs.checkpoints(principal, job_id, after=None, limit=100)
    progress = _progress(sorted(events, key=lambda e: e.id))
    if view.row.status == "succeeded":
        progress["percent"] = 100
    return page(request, "job.html", section="jobs", title=view.row.id, view=view, events=events[:200],
                checkpoints=checkpoints, progress=progress,
                live=view.row.status in ("validating_files", "queued", "running"))


@post("/jobs/{job_id:str}/cancel", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def cancel(request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> Redirect:
    jobs.cancel(session_of(request).principal, audit_context(request), job_id)
    return Redirect(f"/jobs/{job_id}", status_code=303)


@post("/jobs/{job_id:str}/resume", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def resume(request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> Redirect:
    jobs.resume(session_of(request).principal, audit_context(request), job_id)
    return Redirect(f"/jobs/{job_id}", status_code=303)


ROUTES = [job_list, new_job, create_job, job_page, cancel, resume]
