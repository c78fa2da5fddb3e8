"""The one place where errors become HTTP responses.

Every 4xx/5xx body is ``{"error": {"code", "message", "param", "type"}}`` (the
``type`` keeps OpenAI's clients happy). Denials — 401, 403, 429 and a
cross-project 404 — are appended to the audit log in their own transaction,
since the action's transaction was rolled back.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from litestar import Request, Response
from litestar.response import Redirect
from litestar.exceptions import HTTPException, ValidationException

from appliance.audit.service import AuditContext, record
from appliance.errors import (
    ApplianceError,
    AuthenticationError,
    CrossProjectDenied,
    RateLimitedError,
)
from appliance.identity.auth import LoginRequired
from appliance.identity.service import Principal, TokenRejected
from appliance.logs import scrub
from appliance.web.context import request_id_of
from appliance.web.errors import body_of, error_body, status_of
from serving.errors import ServingError

log = logging.getLogger("appliance.errors")

_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}


def _origin(request: Request) -> str | None:
    return request.client.host if request.client else None


def _audit_denial(request: Request, exc: ApplianceError, status: int) -> None:
    """Record a refused request. Never raises: failing to audit must not turn a 401 into a 500."""
    state = request.app.state.appliance
    principal = request.scope.get("user")
    if isinstance(principal, Principal):
        ctx = principal.audit_context(_origin(request), request_id_of(request))
        project = principal.project
    elif isinstance(exc, TokenRejected):
        ctx = AuditContext(actor=exc.user, auth_method=f"token:{exc.token_id}", origin_ip=_origin(request),
                           request_id=request_id_of(request))
        project = None
    else:
        ctx = AuditContext(actor="anonymous", auth_method="none", origin_ip=_origin(request),
                           request_id=request_id_of(request))
        project = None
    action = {401: "auth.denied", 429: "auth.rate_limited"}.get(status, "access.denied")
    reason = exc.code if isinstance(exc, AuthenticationError | RateLimitedError) else exc.message
    if isinstance(exc, LoginRequired):
        reason = exc.reason
    try:
        with state.db.transaction() as s:
            record(
                s, ctx, action, outcome="denied", reason=reason, project=project,
                resource_type="route", resource_id=f"{request.method} {request.scope['path']}",
                details={"status": status},
            )
    except Exception:  # pragma: no cover - logged for operators, response unaffected
        log.exception("could not audit a denied request", extra={"request_id": request_id_of(request)})


def appliance_error_handler(request: Request, exc: ApplianceError) -> Response:
    if isinstance(exc, LoginRequired):
        _audit_denial(request, exc, 401)
        if request.method in ("GET", "HEAD"):
            from urllib.parse import quote

            return Redirect(f"/login?next={quote(exc.next_path)}", status_code=303)
    status, type_ = status_of(exc)
    headers = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
    if status in (401, 403, 429) or isinstance(exc, CrossProjectDenied):
        _audit_denial(request, exc, status)
    if status >= 500:
        log.error("request failed", extra={"code": exc.code, "request_id": request_id_of(request)})
    if _is_portal(request):
        return _portal_error(request, status, exc.message, headers)
    _, body = body_of(exc)
    return Response(body, status_code=status, headers=headers)


_FIELD_PATTERNS = [
    re.compile(r"at `\$\.([^`]+)`"),
    re.compile(r"(?:unknown|missing required) field `([^`]+)`"),
    re.compile(r"Missing required (?:query|header|path|cookie) parameter '([^']+)'"),
]


def _is_portal(request: Request) -> bool:
    handler = request.scope.get("route_handler")
    wants_html = "text/html" in request.headers.get("accept", "")
    return bool(handler is not None and handler.opt.get("portal") and wants_html)


def _browser_page(request: Request) -> bool:
    """A browser asking for a page outside the APIs (``/v1``, ``/api``, ``/static``)."""
    path = request.url.path
    return ("text/html" in request.headers.get("accept", "")
            and not path.startswith(("/v1/", "/api/", "/static/", "/healthz")))


_HEADINGS = {400: "That did not work", 401: "Please log in", 403: "Not allowed", 404: "Not found",
             409: "Conflict", 413: "Too large", 422: "Rejected", 429: "Slow down", 507: "Out of space"}


def _portal_error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    from appliance.portal.render import page

    heading = _HEADINGS.get(status, "Something went wrong")
    response = page(request, "error.html", status_code=status, status=status, heading=heading,
                    message=scrub(message))
    if headers:
        response.headers.update(headers)
    return response


def _validation_param(detail: dict[str, Any]) -> str | None:
    """The offending field: from msgspec's JSON path when the body failed, else the parameter name."""
    message = str(detail.get("message", ""))
    for pattern in _FIELD_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return detail.get("key")


def http_exception_handler(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (validation, unknown route, method, body size) in our shape."""
    status = exc.status_code
    if isinstance(exc, ValidationException):
        details = exc.extra if isinstance(exc.extra, list) else []
        parts = [
            d.get("message") if d.get("key") == "data" else f"`{d.get('key')}`: {d.get('message')}"
            for d in details
            if isinstance(d, dict)
        ]
        message = "invalid request: " + ("; ".join(parts) if parts else exc.detail)
        param = (_validation_param(details[0]) if details and isinstance(details[0], dict)
                 else _validation_param({"message": exc.detail}))
        body = error_body("invalid_request", message, param, "invalid_request_error")
        return Response(body, status_code=400)
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(status, "http_error")
    message = exc.detail if status < 500 else "internal server error"
    if _is_portal(request):
        return _portal_error(request, status, message)
    if status == 404 and _browser_page(request):  # an address no route knows, typed or followed in a browser
        return _portal_error(request, 404, "There is no page at this address.")
    return Response(
        error_body(code, message, None, _HTTP_TYPES.get(status, "server_error")),
        status_code=status,
        headers=exc.headers,
    )


def internal_error_handler(request: Request, exc: Exception) -> Response:
    """Anything unexpected: log it with the request id, tell the caller nothing internal."""
    request_id = request_id_of(request)
    log.exception("unhandled error", extra={"request_id": request_id})
    return Response(
        error_body("internal_error", f"internal server error (request id {request_id})", None, "server_error"),
        status_code=500,
    )


EXCEPTION_HANDLERS = {
    ServingError: appliance_error_handler,  # ApplianceError is ServingError: the engines' errors and ours
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
