"""How a domain error is answered over HTTP: status, OpenAI error type and body (one table, one builder).

The control plane's one exception handler (:mod:`appliance.server.errors`) answers with these, and portal
pages that show an error inline (an upload's JSON reply, a form field) ask the same table.
"""

from __future__ import annotations

from typing import Any

from appliance.errors import (
    ApplianceError,
    AuthenticationError,
    InsufficientStorageError,
    InvalidFieldsError,
    InvalidLinesError,
    NotInitializedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PolicyViolationError,
    RateLimitedError,
)
from serving.errors import error_body

__all__ = ["STATUS", "body_of", "error_body", "status_of"]

#: Domain error -> (HTTP status, OpenAI error type). Most specific first. The errors defined in
#: :mod:`serving.errors` (400 invalid request, 404 not found, 409 conflict, 400 adapter load failure, 502 engine
#: error, 503 no replica) carry their status and type on the class; any other error not listed here is a 500.
STATUS: list[tuple[type[ApplianceError], int, str]] = [
    (AuthenticationError, 401, "authentication_error"),
    (PermissionDeniedError, 403, "permission_error"),
    (PayloadTooLargeError, 413, "invalid_request_error"),
    (RateLimitedError, 429, "rate_limit_error"),
    (PolicyViolationError, 422, "invalid_request_error"),
    (NotInitializedError, 503, "server_error"),
    (InsufficientStorageError, 507, "server_error"),
]


def body_of(exc: ApplianceError) -> tuple[int, dict[str, Any]]:
    """The status and body the API answers ``exc`` with (a policy violation adds its scan report)."""
    status, type_ = status_of(exc)
    body = error_body(exc.code, exc.message, exc.param, type_)
    if isinstance(exc, PolicyViolationError):
        body["error"]["scan"] = exc.details
    if isinstance(exc, (InvalidFieldsError, InvalidLinesError)):  # every problem, each with its field or line
        body["error"]["errors"] = [{"param": param, "message": message} for param, message in exc.problems]
    return status, body


def status_of(exc: ApplianceError) -> tuple[int, str]:
    for cls, status, type_ in STATUS:
        if isinstance(exc, cls):
            return status, type_
    return exc.status, exc.error_type
