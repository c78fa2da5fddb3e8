"""What a handler needs of its request: the request id and the caller's audit context."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Request

from appliance.audit.service import AuditContext

if TYPE_CHECKING:
    from appliance.identity.service import Principal

__all__ = ["audit_context", "request_id_of"]


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def audit_context(request: Request) -> AuditContext:
    """The audit context of an authenticated request."""
    principal: Principal = request.user
    return principal.audit_context(
        origin_ip=request.client.host if request.client else None, request_id=request_id_of(request)
    )
