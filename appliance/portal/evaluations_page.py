"""Evaluations: run models on a test file and compare them (a table of figures, the generations side by side).

An image evaluation's images come from its result file, read (and audited) with the page like a text
evaluation's answers, and are sent in the page as ``data:`` URLs (as the playground sends its images):
images larger than :data:`THUMBNAIL` pixels as JPEG previews of that size, smaller ones as stored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Annotated, Any

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath
from litestar.response import Redirect, Template

from appliance.catalog.service import CatalogService
from appliance.errors import CrossProjectDenied, InvalidRequestError, NotFoundError
from appliance.evaluations.service import (
    DEFAULT_IMAGES_PER_PROMPT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MAX_MODELS,
    OPTIONS,
    PURPOSE,
    TERMINAL,
    EvaluationService,
)
from appliance.files.service import FileService
from appliance.identity.roles import Permission, role_allows
from appliance.portal.render import page, portal, session_of
from appliance.web.context import audit_context

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
#: The form's model selects: ``model1`` ... ``model4``.
MODEL_FIELDS = tuple(f"model{i + 1}" for i in range(MAX_MODELS))
#: The form's defaults (each kind's options: the form sends those of the chosen models' kind).
DEFAULTS = {"samples": str(DEFAULT_SAMPLES), "max_tokens": str(DEFAULT_MAX_TOKENS),
            "images_per_prompt": str(DEFAULT_IMAGES_PER_PROMPT), "num_inference_steps": str(DEFAULT_STEPS),
            "seed": str(DEFAULT_SEED)}
#: Largest side, in pixels, of an image shown in the page; larger ones are sent as JPEG previews of this size.
THUMBNAIL = 256


def _model_kinds(principal: Any, catalog: CatalogService) -> dict[str, str]:
    """Every model an evaluation may name (text and image base models, their fine-tunes) and its kind."""
    bases = {m.name: m.kind for m in catalog.list_base_models() if m.kind in OPTIONS}
    adapters = {a.row.id: bases[a.row.base_model] for a in catalog.list_adapters(principal)
                if a.row.base_model in bases}
    return {**dict(sorted(bases.items())), **adapters}


def _choices(request: Request, files: FileService, catalog: CatalogService) -> dict[str, Any]:
    """The form's test files and models. A global viewer sees several projects' files and fine-tunes: each test
    file is shown with its project (a fine-tune's id names its own), and a fine-tune of another project than the
    test file's is refused at submission, shown at its field."""
    principal = session_of(request).principal
    views, _ = files.list(principal, project=None, purpose=PURPOSE, after=None, limit=500, order="desc")
    test_files = [v for v in views if v.row.decision == "accepted"]
    return {"test_files": test_files, "several_projects": len({v.project for v in test_files}) > 1,
            "model_choices": _model_kinds(principal, catalog), "model_fields": MODEL_FIELDS}


def _field_errors(exc: InvalidRequestError | NotFoundError) -> dict[str, str]:
    """The problems that belong to one of the form's fields, by field (``models[i]`` is select ``model<i+1>``)."""
    problems = getattr(exc, "problems", None) or [(exc.param, exc.message)]
    errors: dict[str, str] = {}
    for param, message in problems:
        field = param
        if isinstance(param, str) and param.startswith("models[") and param.endswith("]") and param[7:-1].isdigit():
            field = f"model{int(param[7:-1]) + 1}"
        if field in MODEL_FIELDS or field in ("file", *DEFAULTS):
            errors[field] = f"{errors[field]}; {message}" if field in errors else message
    return errors


def _list_page(request: Request, evaluations: EvaluationService, files: FileService, catalog: CatalogService,
               values: dict[str, str], error: str | None = None, status_code: int = 200,
               field_errors: dict[str, str] | None = None) -> Template:
    views, _ = evaluations.list(session_of(request).principal, after=None, limit=100)
    return page(request, "evaluations.html", section="evaluations", title="Evaluations", status_code=status_code,
                rows=views, live=any(v.row.status not in TERMINAL for v in views), values=values, error=error,
                field_errors=field_errors or {}, **_choices(request, files, catalog))


@get("/evaluations", opt=portal(Permission.JOBS_READ), include_in_schema=False, sync_to_thread=True)
def evaluation_list(request: Request, evaluations: NamedDependency[EvaluationService],
                    files: NamedDependency[FileService], catalog: NamedDependency[CatalogService]) -> Template:
    return _list_page(request, evaluations, files, catalog, dict(DEFAULTS))


@post("/evaluations", opt=portal(Permission.JOBS_WRITE), include_in_schema=False, sync_to_thread=True)
def create_evaluation(request: Request, evaluations: NamedDependency[EvaluationService],
                      files: NamedDependency[FileService], catalog: NamedDependency[CatalogService],
                      data: Form) -> Template | Redirect:
    """Validated by the same code as ``POST /v1/evaluations``; a problem is shown above the form.

    The form holds both kinds' options; it sends those of the first chosen model's kind.
    """
    principal = session_of(request).principal
    body: dict[str, Any] = {"file": data.get("file") or None,
                            "models": [data[f] for f in MODEL_FIELDS if data.get(f)]}
    kind = _model_kinds(principal, catalog).get(body["models"][0]) if body["models"] else None
    for key in ("samples", *OPTIONS[kind or "llm"]):
        text = (data.get(key) or "").strip()
        body[key] = int(text) if text.isdigit() else (text or None)
    try:
        test_file = files.get(principal, body["file"]) if body["file"] else None
        project = files.resolve_project(principal, test_file.project if test_file else None)
        view = evaluations.create(principal, audit_context(request), project, body)
    except CrossProjectDenied:
        raise  # answered 404 and audited, like the API
    except (InvalidRequestError, NotFoundError) as exc:
        return _list_page(request, evaluations, files, catalog, {**dict.fromkeys(DEFAULTS, ""), **data},
                          error=exc.message, status_code=400, field_errors=_field_errors(exc))
    return Redirect(f"/evaluations/{view.row.id}", status_code=303)


@get("/evaluations/{evaluation_id:str}", opt=portal(Permission.JOBS_READ), include_in_schema=False,
     sync_to_thread=True)
def evaluation_page(request: Request, evaluations: NamedDependency[EvaluationService],
                    files: NamedDependency[FileService], evaluation_id: FromPath[str]) -> Template:
    principal = session_of(request).principal
    view = evaluations.get(principal, evaluation_id)
    samples = None
    result_file = view.row.result_file if view.row.result_erased_at is None else None  # erased: the page says so
    if result_file and role_allows(principal.role, Permission.FILES_CONTENT):  # test data: read, audited
        try:
            _, chunks = files.content(principal, audit_context(request), result_file)
            samples = json.loads(b"".join(chunks)).get("samples") or []
        except NotFoundError:
            result_file = None  # deleted (retention or a user's request)
    if samples and view.row.kind == "diffusion":
        samples = [{**smp, "images": {m: [_shown(b) for b in smp.get("images", {}).get(m) or []]
                                      for m in view.row.models}} for smp in samples]
    best = {}
    results = view.row.results or []
    for key, better in (("loss", min), ("exact_match", max), ("token_f1", max), ("clip_t", max)):
        values = [r[key] for r in results if r.get(key) is not None]
        if len(values) > 1:
            best[key] = better(values)
    return page(request, "evaluation.html", section="evaluations", title=view.row.id, view=view,
                results=results, best=best, samples=samples, result_file=result_file,
                live=view.row.status not in TERMINAL)


def _shown(encoded: str) -> str | None:
    """A stored image (base64 PNG or JPEG) as a ``data:`` URL: as stored up to :data:`THUMBNAIL` px, else a JPEG
    preview."""
    from PIL import Image, UnidentifiedImageError

    try:
        png = base64.b64decode(encoded, validate=True)
        image = Image.open(io.BytesIO(png))
        if max(image.size) <= THUMBNAIL and image.format in ("PNG", "JPEG"):
            return f"data:image/{image.format.lower()};base64," + base64.b64encode(png).decode()
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError, TypeError):
        return None  # shown as missing rather than failing the page
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


@post("/evaluations/{evaluation_id:str}/cancel", opt=portal(Permission.JOBS_WRITE), include_in_schema=False,
      sync_to_thread=True)
def cancel_evaluation(request: Request, evaluations: NamedDependency[EvaluationService],
                      evaluation_id: FromPath[str]) -> Redirect:
    evaluations.cancel(session_of(request).principal, audit_context(request), evaluation_id)
    return Redirect(f"/evaluations/{evaluation_id}", status_code=303)


ROUTES = [evaluation_list, create_evaluation, evaluation_page, cancel_evaluation]
