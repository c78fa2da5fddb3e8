"""Fine-tuning: the job form with inline validation, the job list, and a live job page.

The form is rendered for the kind of the chosen base model: LoRA/QLoRA with
the privacy options for language models, LoRA/DreamBooth/DreamBooth+LoRA for
image models. Choosing a model of the other kind re-renders the form (a
button without JavaScript, automatically with it); the job is validated by the
same code as ``POST /v1/fine_tuning/jobs`` and every problem is shown next to
its field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery
from litestar.response import Redirect, Response, Template

from appliance.catalog.service import CatalogService
from appliance.errors import CrossProjectDenied, InvalidRequestError, NotFoundError
from appliance.files.service import FileService
from appliance.identity.roles import Permission, role_allows
from appliance.jobs.memorization import DEFAULTS as MEMORIZATION_DEFAULTS
from appliance.jobs.memorization import parse_memorization
from appliance.jobs.recipes import DATASET_PURPOSE, registry_of
from appliance.jobs.schemas import SUFFIX_EXPECTED, SUFFIX_PATTERN
from appliance.jobs.service import ACTIVE, CLASS_IMAGE_METHODS, JobService, Phase
from appliance.db.base import utcnow
from appliance.portal.render import line_chart, page, percent, portal, scatter_chart, session_of
from appliance.web.context import audit_context
from appliance.services import AppState

if TYPE_CHECKING:
    from appliance.jobs.models import JobEvent

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


@dataclass(frozen=True)
class Field:
    """One hyperparameter input: its name (the validator's), a hint, its input type.

    ``methods`` (the methods that have this hyperparameter) is filled in from
    the recipe registry when the form is rendered (:func:`_fields`).
    """

    name: str
    hint: str
    methods: tuple[str, ...] = ()
    type: str = "number"  # number ("auto" or a number), text (empty = none), select, checkbox
    default: str = "auto"
    choices: tuple[str, ...] = ()
    #: the server's range for a number (checked in the browser too; a test keeps them equal)
    min: float | None = None
    max: float | None = None
    integer: bool = False
    #: ``min`` itself is refused (a learning rate must be above 0)
    above: bool = False


#: Hyperparameters offered on the form per kind of base model ("auto" by default).
FIELDS: dict[str, list[Field]] = {
    "llm": [
        Field("n_epochs", "passes over the data, 1 to 100", min=1, max=100, integer=True),
        Field("batch_size", "examples per step, 1 to 1024", min=1, max=1024, integer=True),
        Field("learning_rate", "e.g. 2e-4; above 0, at most 1", min=0, max=1, above=True),
        Field("lora_r", "adapter rank, e.g. 16; 1 to 256", min=1, max=256, integer=True),
        Field("lora_alpha", "e.g. 32; above 0", min=0, above=True),
        Field("lora_dropout", "0 to 0.5", min=0, max=0.5),
        Field("max_seq_length", "tokens, 16 to 131072", min=16, max=131072, integer=True),
        Field("warmup_ratio", "0 to 0.5", min=0, max=0.5),
        Field("weight_decay", "e.g. 0.0; 0 to 1", min=0, max=1),
        Field("gradient_accumulation_steps", "micro-batches per step, 1 to 1024", min=1, max=1024, integer=True),
        Field("checkpoint_every_steps", "0 = never", min=0, integer=True),
    ],
    "diffusion": [
        Field("resolution", "pixels, a multiple of 8; auto = the model's native size (1024 for SDXL, 512 for "
                            "SD 1.5); SDXL sorts photos of other shapes into aspect-ratio buckets"),
        Field("max_train_steps", "optimizer steps, e.g. 500"),
        Field("learning_rate", "e.g. 1e-4 (LoRA), 5e-6 (DreamBooth)"),
        Field("rank", "LoRA rank, e.g. 4"),
        Field("train_batch_size", "images per step"),
        Field("gradient_accumulation_steps", "micro-batches per step"),
        Field("instance_prompt", "e.g. a photo of sks dog; empty = the dataset's", type="text", default=""),
        Field("class_prompt", "e.g. a photo of a dog; turns on prior preservation", type="text", default=""),
        Field("prior_loss_weight", "with a class prompt, e.g. 1.0"),
        Field("num_class_images", "with a class prompt; auto = as many as uploaded, else 100"),
        Field("snr_gamma", "empty = plain MSE; 5.0 is usual", type="number", default=""),
        Field("mixed_precision", "auto = bf16 where the GPU has it", type="select",
              choices=("auto", "no", "fp16", "bf16")),
        Field("train_text_encoder", "also train the text encoder (both of SDXL's)", type="checkbox", default=""),
        Field("gradient_checkpointing", "recompute activations: less memory, slower steps; auto = the plan's choice",
              type="select", choices=("auto", "on", "off")),
        Field("use_8bit_adam", "8-bit optimizer state (bitsandbytes): less memory; auto = the plan's",
              type="select", choices=("auto", "on", "off")),
        Field("checkpoint_every_steps", "0 = never"),
        Field("validation_every_steps", "sample images every N steps; 0 = never"),
    ],
}
METHODS: dict[str, dict[str, str]] = {
    "llm": {"lora": "LoRA", "qlora": "QLoRA (4-bit base)"},
    "diffusion": {"lora": "LoRA on captioned images", "dreambooth": "DreamBooth (full UNet)",
                  "dreambooth_lora": "DreamBooth + LoRA"},
}
DEFAULT_METHOD = {"llm": "lora", "diffusion": "dreambooth_lora"}
KIND_LABEL = {"llm": "language model", "diffusion": "image model"}
#: The privacy inputs of a language-model job (``dp`` in the hyperparameters, ``memorization`` beside them).
DP_FIELDS = ("dp_epsilon", "dp_delta", "dp_max_grad_norm")
PRIVACY_DEFAULTS = {"dp_epsilon": "", "dp_delta": "auto", "dp_max_grad_norm": "1.0",
                    "canaries": str(MEMORIZATION_DEFAULTS["canaries"]),
                    "extraction_probe": "on" if MEMORIZATION_DEFAULTS["extraction_probe"] else ""}


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


def _fields(kind: str) -> list[Field]:
    """The form's inputs for ``kind``, each with the methods that have that hyperparameter (from the registry)."""
    registry = registry_of(kind)
    return [replace(f, methods=tuple(m for m in registry.methods if registry.has_field(m, f.name)))
            for f in FIELDS[kind]]


def _dp_methods(kind: str) -> tuple[str, ...]:
    """The methods of ``kind`` that declare differential privacy (``supports_dp``)."""
    registry = registry_of(kind)
    return tuple(m for m in registry.methods if registry.capabilities(m).supports_dp)


def _defaults(kind: str) -> dict[str, str]:
    values = {f.name: f.default for f in FIELDS[kind]}
    values["method"] = DEFAULT_METHOD[kind]
    if kind == "llm":
        values.update(PRIVACY_DEFAULTS)
    return values


def _kind_of(appliance: AppState, model: str | None) -> str:
    models = [m for m in appliance.catalog.list_base_models() if m.kind in FIELDS]
    chosen = next((m for m in models if m.name == model), models[0] if models else None)
    return chosen.kind if chosen is not None else "llm"


def _form_context(request: Request, files: FileService, appliance: AppState, values: dict[str, str],
                  errors: dict[str, str], kind: str) -> dict[str, Any]:
    principal = session_of(request).principal
    views, _ = files.list(principal, project=None, purpose=DATASET_PURPOSE[kind], after=None, limit=500,
                          order="desc")
    models = [m for m in appliance.catalog.list_base_models() if m.kind in FIELDS]
    # the starting point for each base of this form's kind, with the memory plan's reason
    advice = [(m.name, appliance.jobs.starting_points(m.path, m.kind)[1]) for m in models if m.kind == kind]
    return {"models": models, "advice": [(name, text) for name, text in advice if text],
            "datasets": [v for v in views if v.row.decision == "accepted"], "methods": METHODS[kind],
            "fields": _fields(kind), "dp_methods": _dp_methods(kind), "values": values, "errors": errors,
            "kind": kind, "kind_label": KIND_LABEL, "suffix_pattern": SUFFIX_PATTERN, "suffix_expected": SUFFIX_EXPECTED}


def _form_page(request: Request, files: FileService, appliance: AppState, values: dict[str, str],
               errors: dict[str, str], kind: str, *, status_code: int = 200,
               flashes: list[tuple[str, str]] | None = None) -> Template:
    return page(request, "job_new.html", section="jobs", title="New fine-tuning job", status_code=status_code,
                flashes=flashes or [], **_form_context(request, files, appliance, values, errors, kind))


@get("/jobs", opt=portal(Permission.JOBS_READ), include_in_schema=False, sync_to_thread=True)
def job_list(request: Request, jobs: NamedDependency[JobService]) -> Template:
    """The jobs, newest first; a search's trials are listed under it in trial order, not among the other jobs."""
    views, _ = jobs.list(session_of(request).principal, after=None, limit=100, trials=False)
    trials = jobs.trials_of(views)
    shown = views + [t for v in views for t in trials.get(v.row.id, [])]
    progress = jobs.progress([v.row.id for v in shown])
    now = utcnow()

    def row(v) -> dict[str, Any]:
        return {"view": v, "progress": progress.get(v.row.id), **timing(v.row, now)}

    rows = [{**row(v), "trials": [row(t) for t in trials.get(v.row.id, [])]} for v in views]
    live = any(v.row.status in ACTIVE for v in shown)
    return page(request, "jobs.html", section="jobs", title="Fine-tuning", rows=rows, live=live)


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``: how long, to the precision a person reads."""
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def timing(row: Any, now: Any) -> dict[str, str]:
    """A job's elapsed time (from its start to its end, or now) and, while it runs, the time left."""
    out = {"elapsed": "", "eta": ""}
    if row.started_at is not None:
        out["elapsed"] = duration(((row.finished_at or now) - row.started_at).total_seconds())
    if row.status == "running" and row.estimated_finish is not None:
        left = (row.estimated_finish - now).total_seconds()
        out["eta"] = f"about {duration(left)} left" if left > 0 else "finishing"
    return out


@get("/jobs/new", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def new_job(request: Request, files: NamedDependency[FileService], appliance: NamedDependency[AppState],
            model: FromQuery[str | None] = None) -> Template:
    kind = _kind_of(appliance, model)
    return _form_page(request, files, appliance, {**_defaults(kind), "model": model or ""}, {}, kind)


@post("/jobs", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def create_job(request: Request, jobs: NamedDependency[JobService], files: NamedDependency[FileService],
               appliance: NamedDependency[AppState], data: Form) -> Template | Redirect:
    """Validate with the same code as the API; show every problem next to its field."""
    principal = session_of(request).principal
    kind = _kind_of(appliance, data.get("model"))
    if data.get("step") == "choose" or data.get("kind", kind) != kind:
        # Another kind of base model: its own methods, hyperparameters and datasets.
        same = data.get("kind") == kind  # nothing to reset: keep every input
        kept = dict(data) if same else {k: data[k] for k in ("model", "suffix") if k in data}
        flashes = [] if data.get("step") == "choose" else [
            ("error", f"The options below are those of the {KIND_LABEL[kind]} {data.get('model')}: "
                      "check them and start again.")]
        return _form_page(request, files, appliance, kept if same else {**_defaults(kind), **kept}, {}, kind,
                          flashes=flashes)
    body = _job_body(data, kind)
    try:
        training = files.get(principal, body["training_file"]) if body["training_file"] else None
        project = files.resolve_project(principal, training.project if training else None)
        view = jobs.create(principal, audit_context(request), project, body)
    except CrossProjectDenied:
        raise  # answered 404 and audited, like the API; never shown as a form problem
    except InvalidRequestError as exc:
        errors = _field_errors(exc, kind)
        if kind == "llm":  # the service stops at the method's problems: show the privacy ones too
            try:
                parse_memorization(body.get("memorization"), base_kind=kind)
            except InvalidRequestError as more:
                errors = {**_field_errors(more, kind), **errors}
        return _form_page(request, files, appliance, data, errors, kind, status_code=400)
    except Exception as exc:  # not found and the like: shown against the form too
        if not hasattr(exc, "message"):
            raise
        return _form_page(request, files, appliance, data, _field_errors(exc, kind), kind, status_code=400)
    return Redirect(f"/jobs/{view.row.id}", status_code=303)


def _job_body(data: dict[str, str], kind: str) -> dict[str, Any]:
    """The API's job object from the form: "auto" and empty inputs are left out (the validator's defaults)."""
    method = data.get("method") or DEFAULT_METHOD[kind]
    hp: dict[str, Any] = {}
    for f in FIELDS[kind]:
        raw = data.get(f.name, "")
        if f.type == "checkbox":
            if raw:
                hp[f.name] = True
        elif f.type == "text":
            if raw.strip():
                hp[f.name] = raw
        elif f.type == "select":
            if raw and raw != "auto":
                hp[f.name] = {"on": True, "off": False}.get(raw, raw) if "on" in f.choices else raw
        elif (value := _number(raw)) is not None:
            hp[f.name] = value
    body: dict[str, Any] = {
        "model": data.get("model") or None, "training_file": data.get("training_file") or None,
        "suffix": data.get("suffix") or None, "method": {"type": method, method: {"hyperparameters": hp}},
    }
    if kind == "diffusion" and data.get("class_images_file") and method in CLASS_IMAGE_METHODS:
        body["class_images_file"] = data["class_images_file"]
    if kind == "llm":
        body["validation_file"] = data.get("validation_file") or None
        if data.get("dp_epsilon", "").strip():  # an epsilon turns differential privacy on
            dp = {k: _number(data.get(f"dp_{k}", "")) for k in ("epsilon", "delta", "max_grad_norm")}
            hp["dp"] = {k: v for k, v in dp.items() if v is not None}
        canaries = _number(data.get("canaries", ""))
        body["memorization"] = {"canaries": 0 if canaries is None else canaries,
                                "extraction_probe": bool(data.get("extraction_probe"))}
    return body


def _field_errors(exc: Exception, kind: str) -> dict[str, str]:
    """Map a validation error onto the form's fields (hyperparameter errors list every field); the rest go on top."""
    shown = {"model", "training_file", "validation_file", "class_images_file", "suffix", "type",
             *(f.name for f in FIELDS[kind])}
    if kind == "llm":
        shown |= {*DP_FIELDS, "canaries", "extraction_probe"}
    problems = getattr(exc, "problems", None) or [(getattr(exc, "param", None) or "form", exc.message)]
    errors: dict[str, str] = {}
    for path, text in problems:
        field, named = _field_of(path, text)
        if field not in shown:
            field = "form"
        text = f"{named} {text}" if getattr(exc, "problems", None) else text
        errors[field] = f"{errors[field]}; {text}" if field in errors else text
    return errors


def _field_of(path: str, text: str) -> tuple[str, str]:
    """``(form field, name to show)`` of an error's ``param``."""
    if ".hyperparameters." in path:
        rest = path.split(".hyperparameters.", 1)[1]
        if rest == "dp" or rest.startswith("dp."):
            key = rest.split(".", 1)[1] if "." in rest else "epsilon"
            return f"dp_{key}", rest
        return rest, rest
    if path == "memorization":
        match = re.search(r"memorization\.(\w+)", text)
        return (match.group(1) if match else "form"), path
    return path.rsplit(".", 1)[-1], path


def _progress(events: list[JobEvent]) -> dict[str, Any]:
    train, valid = [], []
    step = total = phase = None
    for e in events:
        d = e.data or {}
        if e.type == "metrics":
            if d.get("train_loss") is not None:
                train.append((float(d["step"]), float(d["train_loss"])))
            if d.get("valid_loss") is not None:
                valid.append((float(d["step"]), float(d["valid_loss"])))
            step, total = d.get("step", step), d.get("total_steps", total)
            phase = Phase.of(d.get("phase"))  # the latest report's: a finished phase is no longer shown
    return {"chart": line_chart({"training loss": train, "validation loss": valid}),
            "step": step, "total": total, "percent": percent(step, total), "phase": phase,
            "phase_left": duration(phase.seconds_left) if phase and phase.seconds_left is not None else None}


#: The LLM jobs' sample generations (:mod:`appliance.training.samples`), a result file.
SAMPLES_FILE = "samples.json"


def _result_files(principal: Any, files: FileService, job_id: str, ids: list[str]) -> list[dict[str, Any]]:
    """The job's result files (evaluation grids, validation images) by name."""
    out = []
    for file_id in ids:
        try:
            row = files.get(principal, file_id).row
        except NotFoundError:
            continue  # deleted (retention or a user's request)
        name = row.filename.removeprefix(f"{job_id}-")
        out.append({"id": file_id, "name": name, "bytes": row.bytes, "image": name.lower().endswith(".png")})
    return out


def canary_verdict(canaries: dict[str, Any] | None, max_bits: float | None) -> str | None:
    """Canary exposure in plain words: how much more likely the trained model finds its canaries than chance.

    Exposure (Carlini et al., "The Secret Sharer") is in bits: about 0 for a secret the model never saw,
    up to log2 of the number of possible secrets for one it reproduces. Compared with the base model's
    exposure to the same canaries, so that what the base model finds likely anyway is not counted.
    """
    if not canaries or canaries.get("mean_exposure") is None:
        return None
    gained = canaries["mean_exposure"] - (canaries.get("mean_exposure_base") or 0.0)
    if max_bits and canaries.get("max_exposure") is not None and canaries["max_exposure"] >= 0.5 * max_bits:
        return ("Memorised: the model would likely reproduce a secret seen this often in its training data. "
                "Train with differential privacy, fewer epochs, or deduplicate repeated records.")
    if gained < 1.0:
        return "No sign of memorisation: the canaries are no more likely than for the base model."
    return (f"Some memorisation: the canaries became about {2 ** gained:,.0f}x more likely than for the base "
            "model, though far from being reproduced. Watch this figure if the data repeats secrets.")


def search_view(search: dict[str, Any]) -> dict[str, Any]:
    """A search job's trials for its page: a row per trial (values, state, validation loss, its job) and a plot
    of validation loss per searched parameter (a pruned trial at its last report, hollow; the best ringed)."""
    best = search.get("best_trial")
    rows = []
    for r in search.get("trial_table") or []:
        reports = r.get("reports") or {}
        last = reports[max(reports, key=int)] if reports else None
        kind = "best" if r["number"] == best else r["state"]
        rows.append({**r, "kind": kind, "shown": r.get("value") if r.get("value") is not None else last,
                     "params_text": ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                              for k, v in r["params"].items())})
    charts = []
    for name, dim in (search.get("space") or {}).items():
        points = [(float(r["params"][name]), float(r["shown"]), "best" if r["kind"] == "best" else
                   "pruned" if r["state"] == "pruned" else "complete")
                  for r in rows if r["shown"] is not None and isinstance(r["params"].get(name), int | float)]
        charts.append({"name": name, "svg": scatter_chart(points, x_label=name, log_x=dim.get("scale") == "log")})
    return {"rows": rows, "charts": charts, "budget": search, "best": best}


@get("/jobs/{job_id:str}", opt=portal(Permission.JOBS_READ), include_in_schema=False, sync_to_thread=True)
def job_page(request: Request, jobs: NamedDependency[JobService], files: NamedDependency[FileService],
             catalog: NamedDependency[CatalogService], job_id: FromPath[str]) -> Template:
    principal = session_of(request).principal
    view = jobs.get(principal, job_id)
    events, _ = jobs.events(principal, job_id, after=None, limit=1000)
    _, checkpoints, _ = jobs.checkpoints(principal, job_id, after=None, limit=100)
    progress = _progress(sorted(events, key=lambda e: e.id))
    if view.row.status == "succeeded":
        progress["percent"] = 100
    try:
        kind = catalog.get_base_model(view.row.model).kind
    except NotFoundError:
        kind = "diffusion" if "subject_fidelity_metric" in (view.row.metrics or {}) else "llm"
    privacy = view.row.privacy or {}
    space = (privacy.get("canaries") or {}).get("randomness_space")
    max_bits = math.log2(space) if isinstance(space, int | float) and space > 1 else None
    results = _result_files(principal, files, job_id, list(view.row.result_files or []))
    sample_file = next((r for r in results if r["name"] == SAMPLES_FILE), None)
    samples = None
    if sample_file and role_allows(principal.role, Permission.FILES_CONTENT):  # validation text: read, audited
        _, chunks = files.content(principal, audit_context(request), sample_file["id"])
        samples = json.loads(b"".join(chunks)).get("samples") or []
    return page(request, "job.html", section="jobs", title=view.row.id, view=view, events=events[:200],
                search=search_view(view.row.search) if view.row.search else None,
                checkpoints=checkpoints, progress=progress, kind=kind, privacy=privacy,
                canary_max_bits=max_bits, canary_verdict=canary_verdict(privacy.get("canaries"), max_bits),
                results=[r for r in results if r is not sample_file], sample_file=sample_file, samples=samples,
                live=view.row.status in ACTIVE, timing=timing(view.row, utcnow()))


@get("/jobs/{job_id:str}/results/{file_id:str}", opt=portal(Permission.FILES_CONTENT), include_in_schema=False,
     sync_to_thread=True)
def job_result(request: Request, jobs: NamedDependency[JobService], files: NamedDependency[FileService],
               job_id: FromPath[str], file_id: FromPath[str]) -> Response:
    """A result image of a job, for its page. Its grid shows training images, so reading it needs
    ``files:content`` and is audited like any read of a dataset."""
    principal = session_of(request).principal
    view = jobs.get(principal, job_id)
    if file_id not in (view.row.result_files or []):
        raise NotFoundError(f"job {job_id!r} has no result file {file_id!r}", param="file_id")
    file_view, chunks = files.content(principal, audit_context(request), file_id)
    media = "image/png" if file_view.row.filename.lower().endswith(".png") else "application/octet-stream"
    return Response(b"".join(chunks), media_type=media,
                    headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"})


@post("/jobs/{job_id:str}/cancel", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def cancel(request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> Redirect:
    jobs.cancel(session_of(request).principal, audit_context(request), job_id)
    return Redirect(f"/jobs/{job_id}", status_code=303)


@post("/jobs/{job_id:str}/resume", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def resume(request: Request, jobs: NamedDependency[JobService], job_id: FromPath[str]) -> Redirect:
    jobs.resume(session_of(request).principal, audit_context(request), job_id)
    return Redirect(f"/jobs/{job_id}", status_code=303)


ROUTES = [job_list, new_job, create_job, job_page, job_result, cancel, resume]
