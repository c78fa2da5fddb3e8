"""Playground: chat with a model the user may query, streamed into the page."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post
from litestar.concurrency import sync_to_thread
from litestar.di import NamedDependency
from litestar.params import FromQuery
from litestar.response import Stream, Template

from appliance.catalog.service import CatalogService
from appliance.identity.roles import Permission
from appliance.inference.service import InferenceService
from appliance.portal.render import page, portal, session_of
from appliance.server.context import audit_context
from serving.protocol import chat_chunks, chat_completion, new_id, parse_chat_request, sse


@get("/playground", opt=portal(Permission.INFERENCE), include_in_schema=False, sync_to_thread=True)
def playground(request: Request, catalog: NamedDependency[CatalogService], model: FromQuery[str | None] = None) -> Template:
    principal = session_of(request).principal
    models = [m.name for m in catalog.list_base_models() if m.kind == "llm"]
    models += [a.row.id for a in catalog.list_adapters(principal) if a.row.kind in ("lora", "qlora")]
    return page(request, "playground.html", section="playground", title="Playground", models=models,
                selected=model if model in models else (models[-1] if models else None))


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


ROUTES = [playground, playground_chat]
