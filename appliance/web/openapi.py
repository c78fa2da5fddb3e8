"""The OpenAPI description: bearer security and the error responses of every operation.

Errors are produced in one place (:mod:`appliance.server.errors`); this module
declares them in one place, so ``/schema/openapi.json`` says what a client
really gets: ``{"error": {"code", "message", "param", "type"}}`` for every 4xx
and 5xx, never Litestar's own ``{"status_code", "detail"}`` shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
    SecurityScheme,
)

from appliance import __version__
from appliance.web.options import PUBLIC_OPT

BEARER = "BearerToken"


class ErrorDetail(msgspec.Struct):
    """What went wrong: a stable ``code``, a sentence saying how to fix it, the field at fault."""

    code: str
    message: str
    param: str | None
    type: str
    #: Only on ``policy_violation`` (422): the scan summary, counts and line numbers, never values.
    scan: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class ErrorBody(msgspec.Struct):
    """Every error response of the API."""

    error: ErrorDetail


class VllmErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: int


class VllmErrorBody(msgspec.Struct):
    """vLLM's runtime-LoRA error shape (its ``code`` is the HTTP status), kept for vLLM clients."""

    error: VllmErrorDetail


_DESCRIPTIONS = {
    400: "Invalid request: a parameter or the body is malformed or breaks a rule (`param` names it).",
    401: "Missing, malformed, unknown, expired or revoked bearer token.",
    403: "The token's role may not perform this operation.",
    404: "No such resource for this caller (another project's resources answer the same).",
    409: "Clashes with existing state, e.g. a duplicate name or a job in the wrong state.",
    413: "The request body is over a configured limit.",
    422: "The content breaks the project's data policy; `scan` says which entity types on which lines.",
    429: "Too many failed authentications from this address; see `Retry-After`.",
    500: "Unexpected server error; the message carries the request id to quote.",
    502: "The serving engine failed.",
    503: "The appliance is not initialised, or no serving replica answered (`no_replica_available`).",
    507: "No space left to store the object; nothing of it was kept.",
}

#: What any authenticated operation may answer besides success.
COMMON_ERRORS = (400, 401, 403, 404, 429, 500)
#: What an operation with a request body may answer on top (the body-size limit); handlers
#: that read their body raw rather than as ``data`` declare it themselves.
BODY_ERRORS = (413,)


def error_responses(*statuses: int, body: Any = ErrorBody) -> dict[int, ResponseSpec]:
    """``responses=`` for a handler that can answer ``statuses`` beyond the common ones."""
    return {s: ResponseSpec(data_container=body, description=_DESCRIPTIONS.get(s, "Error"), generate_examples=False)
            for s in statuses}


def document_errors(app: Litestar) -> None:
    """Declare the error responses of every operation in the schema (those a handler declares win)."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if not isinstance(handler, HTTPRouteHandler) or not handler.resolve_include_in_schema():
                continue
            if handler.opt.get(PUBLIC_OPT):
                statuses: tuple[int, ...] = (500,)
            else:
                takes_body = "data" in handler.parsed_fn_signature.parameters
                statuses = COMMON_ERRORS + (BODY_ERRORS if takes_body else ())
            handler.responses = {**error_responses(*statuses), **(handler.responses or {})}


def operation(*, also_answers: tuple[str, ...] = (), body: dict[str, Schema] | None = None) -> type[Operation]:
    """An ``operation_class`` for what Litestar cannot infer from the handler's signature.

    Args:
        also_answers: Media types the success response may have besides the inferred one.
        body: The request body by media type, for handlers that read their body raw.
    """

    @dataclass
    class _Operation(Operation):
        def __post_init__(self) -> None:
            if body:
                self.request_body = RequestBody(
                    required=True, content={media: OpenAPIMediaType(schema=s) for media, s in body.items()})
            for status, response in (self.responses or {}).items():
                if status.startswith("2") and isinstance(response, OpenAPIResponse) and response.content:
                    for media in also_answers:
                        response.content.setdefault(media, OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)))

    return _Operation


def openapi_config() -> OpenAPIConfig:
    """``/schema/openapi.json``: every operation needs a bearer token unless it says otherwise."""
    return OpenAPIConfig(
        title="Appliance API", version=__version__, path="/schema",
        description="On-prem fine-tuning appliance: OpenAI-compatible files, fine-tuning, models and chat.",
        components=Components(security_schemes={BEARER: SecurityScheme(
            type="http", scheme="bearer", description="An appliance API token (`apl_...`).")}),
        security=[{BEARER: []}],
        # JSON only: the HTML explorers load scripts from CDNs, which an
        # air-gapped appliance must not reference.
        render_plugins=[JsonRenderPlugin()],
    )
