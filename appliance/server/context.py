"""Per-request context: request id, origin, access log line."""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

from litestar import Request
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.errors import InvalidRequestError
from appliance.identity.service import Principal
from appliance.identity.tokens import TOKEN_PATTERN

log = logging.getLogger("appliance.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


class RequestContextMiddleware:
    """Assign a request id and note the start time, before authentication runs.

    A well-formed client-supplied ``X-Request-ID`` is kept so that callers can
    correlate; anything else is replaced.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = scope.setdefault("state", {})
            supplied = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
            usable = _REQUEST_ID_RE.match(supplied) and not TOKEN_PATTERN.search(supplied)
            state["request_id"] = supplied if usable else new_request_id()
            state["started"] = time.perf_counter()
        await self.app(scope, receive, send)


async def stamp_and_log_response(message: Message, scope: Scope) -> None:
    """``before_send`` hook: echo ``X-Request-ID`` and log one line per response.

    Runs on the outermost ``send``, so responses made by exception handlers
    and the router (unknown routes) are covered too. The line has method,
    path (never the query string, which may carry personal data), status,
    latency and actor.
    """
    if scope["type"] != "http" or message["type"] != "http.response.start":
        return
    state = scope.setdefault("state", {})
    request_id = state.setdefault("request_id", new_request_id())
    message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
    started = state.get("started")
    user = scope.get("user")
    log.info(
        "request",
        extra={
            "method": scope["method"],
            "path": scope["path"],
            "status": message["status"],
            "ms": round((time.perf_counter() - started) * 1000, 1) if started else None,
            "request_id": request_id,
            "actor": user.user if isinstance(user, Principal) else None,
            "origin_ip": scope["client"][0] if scope.get("client") else None,
        },
    )


#: What msgspec raises, outside its ``DecodeError``, for bodies no JSON decoder should accept.
UNDECODABLE = (RecursionError, UnicodeDecodeError)


def undecodable_body(exc: BaseException) -> InvalidRequestError:
    """The 400 for a body that is nested too deeply or is not UTF-8."""
    what = "nested too deeply" if isinstance(exc, RecursionError) else "not valid UTF-8"
    return InvalidRequestError(f"the request body is not valid JSON: it is {what}", param="body")


#: Methods whose JSON body :func:`check_json_body` reads.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_body_problem(body: bytes) -> str | None:
    """What is wrong with ``body`` as a JSON document (RFC 8259: UTF-8, no BOM), or None when it is one.

    Our own words, from the standard library's decoder, so that the answer does
    not change with how a JSON library (msgspec, under Litestar) words or
    classes its errors from one release to the next.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"the request body is not valid UTF-8 (byte {exc.start + 1} is 0x{body[exc.start]:02x}); "
                "send JSON encoded as UTF-8")
    try:
        json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except ValueError as exc:
        return f"the request body is not valid JSON: {exc}"
    except RecursionError:
        return "the request body is not valid JSON: it is nested too deeply"
    return None


def _takes_json(request: Request) -> bool:
    media_type = request.content_type[0].lower()
    if media_type:
        return media_type == "application/json" or media_type.endswith("+json")
    # No Content-Type: Litestar decodes a ``data`` parameter as JSON all the same.
    parameters = getattr(getattr(request.route_handler, "parsed_fn_signature", None), "parameters", None)
    return parameters is None or "data" in parameters


async def check_json_body(request: Request) -> None:
    """``before_request`` hook: a JSON body that is not UTF-8 or not JSON is a 400 ``invalid_request``.

    Runs after authentication and the guards, before Litestar parses the body
    into the handler's ``data`` (the body is read once; Litestar keeps it).
    """
    if request.method not in BODY_METHODS or not _takes_json(request):
        return
    body = await request.body()
    if body and (problem := json_body_problem(body)):
        raise InvalidRequestError(problem, param="body")


class ApplianceRequest(Request):
    """Litestar's request, except that an undecodable JSON body is a 400, not a 500.

    Litestar turns msgspec's ``DecodeError`` into a 400 but lets ``RecursionError``
    (``[[[[...`` a thousand deep) and ``UnicodeDecodeError`` through as 500s.
    """

    async def json(self) -> Any:
        try:
            return await super().json()
        except UNDECODABLE as exc:
            raise undecodable_body(exc) from None
