"""Playground: chat with a language model (streamed into the page) and generate images with an image model.

Both use the same paths as the API (``/v1/chat/completions``, ``/v1/images/generations``):
model routing, project rules, output guard and audit, with the session's identity.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

from litestar import Request, get, post
from litestar.concurrency import sync_to_thread
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromQuery
from litestar.response import Redirect, Stream, Template

from appliance.catalog.service import CatalogService
from appliance.errors import ApplianceError, CrossProjectDenied
from appliance.identity.roles import Permission
from appliance.inference.service import InferenceService
from appliance.portal.render import page, portal, session_of
from appliance.web.context import audit_context
from appliance.web.errors import status_of
from serving.protocol import chat_chunks, chat_completion, new_id, parse_chat_request, sse

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
#: Image sizes offered (the tiny demo pipeline draws 16 or 32 pixels; real ones 512 and up).
SIZES = ("16x16", "32x32", "64x64", "256x256", "512x512", "768x768", "1024x1024")
IMAGE_DEFAULTS = {"n": "4", "size": "", "seed": "", "steps": ""}
MAX_IMAGES = 10


def _models(catalog: CatalogService, principal: Any, kind: str) -> list[str]:
    """Base models of ``kind`` and the fine-tunes of them the principal may query."""
    base = {m.name: m.kind for m in catalog.list_base_models()}
    names = [name for name, k in base.items() if k == kind]
    names += [a.row.id for a in catalog.list_adapters(principal) if base.get(a.row.base_model) == kind]
    return names


def _kind(catalog: CatalogService, principal: Any, model: str | None) -> str | None:
    if model is None:
        return None
    for kind in ("llm", "diffusion"):
        if model in _models(catalog, principal, kind):
            return kind
    return None


@get("/playground", opt=portal(Permission.INFERENCE), include_in_schema=False, sync_to_thread=True)
def playground(request: Request, catalog: NamedDependency[CatalogService],
               model: FromQuery[str | None] = None) -> Template | Redirect:
    principal = session_of(request).principal
    if model is not None and _kind(catalog, principal, model) == "diffusion":
        from urllib.parse import quote

        return Redirect(f"/playground/images?model={quote(model, safe='')}", status_code=303)
    models = _models(catalog, principal, "llm")
    base_names = {m.name for m in catalog.list_base_models() if m.kind == "llm"}
    bases = {a.row.id: a.row.base_model for a in catalog.list_adapters(principal) if a.row.base_model in base_names}
    return page(request, "playground.html", section="playground", title="Playground", tab="chat", models=models,
                selected=model if model in models else (models[-1] if models else None), bases=bases,
                base_names=base_names)


@post("/playground/chat", opt=portal(Permission.INFERENCE), include_in_schema=False, status_code=200)
async def playground_chat(request: Request, inference: NamedDependency[InferenceService]) -> Any:
    """The same path as ``/v1/chat/completions`` (routing, guard, audit), with the session's identity."""
    req = parse_chat_request(await request.body())
    principal, ctx = session_of(request).principal, audit_context(request)
    if not req.stream:
        result = await sync_to_thread(inference.generate, principal, ctx, req, "chat")
        return chat_completion(result).to_dict()
    stream = await sync_to_thread(inference.stream, principal, ctx, req, "chat")
    chunks = chat_chunks(stream, model=req.model, n=req.n, include_usage=False, id=new_id("chatcmpl"))
    return Stream(sse(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _images_page(request: Request, catalog: CatalogService, values: dict[str, str], *, errors: dict[str, str],
                 images: list[str], status_code: int = 200) -> Template:
    models = _models(catalog, session_of(request).principal, "diffusion")
    selected = values.get("model")
    return page(request, "playground_images.html", section="playground", title="Playground: images", tab="images",
                models=models, selected=selected if selected in models else (models[-1] if models else None),
                values=values, errors=errors, images=images, sizes=SIZES, status_code=status_code)


@get("/playground/images", opt=portal(Permission.INFERENCE), include_in_schema=False, sync_to_thread=True)
def playground_images(request: Request, catalog: NamedDependency[CatalogService],
                      model: FromQuery[str | None] = None) -> Template:
    return _images_page(request, catalog, {**IMAGE_DEFAULTS, "model": model or ""}, errors={}, images=[])


@post("/playground/images", opt=portal(Permission.INFERENCE), include_in_schema=False, sync_to_thread=True)
def playground_generate(request: Request, catalog: NamedDependency[CatalogService],
                        inference: NamedDependency[InferenceService], data: Form) -> Template:
    """A plain form post: the images come back in the page as ``data:`` URLs (nothing is kept on disk)."""
    errors: dict[str, str] = {}
    n = _integer(data.get("n", ""), "n", errors, low=1, high=MAX_IMAGES, default=1)
    seed = _integer(data.get("seed", ""), "seed", errors, low=0, high=2**31 - 1)
    steps = _integer(data.get("steps", ""), "steps", errors, low=1, high=500)
    prompt = data.get("prompt", "")
    if not prompt.strip():
        errors["prompt"] = "Describe the image to generate."
    if errors:
        return _images_page(request, catalog, data, errors=errors, images=[], status_code=400)
    try:
        pngs = inference.images(session_of(request).principal, audit_context(request), model=data.get("model", ""),
                                prompt=prompt, n=n, size=data.get("size") or None, seed=seed,
                                num_inference_steps=steps)
    except CrossProjectDenied:
        raise  # a 404, audited, like the API
    except ApplianceError as exc:
        status = status_of(exc)[0]
        if status in (401, 403):
            raise
        field = (exc.param or "form").rsplit(".", 1)[-1]
        field = {"num_inference_steps": "steps"}.get(field, field)
        if field not in ("model", "prompt", "n", "size", "seed", "steps"):
            field = "form"
        return _images_page(request, catalog, data, errors={field: exc.message}, images=[],
                            status_code=status)
    images = ["data:image/png;base64," + base64.b64encode(png).decode() for png in pngs]
    return _images_page(request, catalog, data, errors={}, images=images)


def _integer(raw: str, name: str, errors: dict[str, str], *, low: int, high: int,
             default: int | None = None) -> int | None:
    raw = raw.strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        errors[name] = f"{name} must be an integer from {low} to {high}; got {raw!r}"
        return None
    return value


ROUTES = [playground, playground_chat, playground_images, playground_generate]
