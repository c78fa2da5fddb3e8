"""Bearer authentication, the failure rate limiter and the permission guard."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from litestar.concurrency import sync_to_thread
from litestar.connection import ASGIConnection
from litestar.middleware.authentication import AbstractAuthenticationMiddleware, AuthenticationResult

from appliance.errors import AuthenticationError, PermissionDeniedError, RateLimitedError
from appliance.identity.roles import Permission, role_allows
from appliance.identity.service import IdentityService, Principal
from appliance.identity.sessions import COOKIE, SessionService
from appliance.web.options import PERMISSION_OPT, PORTAL_OPT, PUBLIC_OPT

if TYPE_CHECKING:
    from litestar.handlers.base import BaseRouteHandler


class AuthState(Protocol):
    """What authentication needs of the app's state (``app.state.appliance``, wired in :mod:`appliance.server`)."""

    identity: IdentityService
    sessions: SessionService
    limiter: FailureLimiter



class FailureLimiter:
    """Counts failed authentications per origin in a sliding window.

    Once an origin reaches ``max_failures`` within ``window_s`` seconds, every
    authentication attempt from it is refused until the oldest failure ages
    out, so a guesser learns nothing more, valid token or not.
    """

    def __init__(self, max_failures: int, window_s: float, clock=time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, origin: str, now: float) -> deque[float]:
        q = self._failures.setdefault(origin, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if not q:
            del self._failures[origin]
            return deque()
        return q

    def check(self, origin: str) -> None:
        """Raise :class:`RateLimitedError` if ``origin`` is currently locked out."""
        with self._lock:
            now = self._clock()
            q = self._prune(origin, now)
            if len(q) >= self.max_failures:
                retry = max(1, int(q[0] + self.window_s - now) + 1)
                raise RateLimitedError(
                    f"too many failed authentication attempts from this address; retry in {retry} s",
                    retry_after_s=retry,
                )

    def fail(self, origin: str) -> None:
        with self._lock:
            now = self._clock()
            self._prune(origin, now)
            self._failures.setdefault(origin, deque()).append(now)


def origin_of(connection: ASGIConnection) -> str:
    return connection.client.host if connection.client else "unknown"


def bearer_of(connection: ASGIConnection) -> str | None:
    """The token in ``Authorization: Bearer <token>``; ``""`` for another scheme; None if absent."""
    header = connection.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return value.strip()


CSRF_HEADER = "x-csrf-token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(AuthenticationError):
    """A portal page was asked for without a live session: answered with a redirect to the log-in page."""

    code = "login_required"

    def __init__(self, message: str, *, reason: str, next_path: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.next_path = next_path


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    """Resolve the caller on every non-public route.

    API routes take ``Authorization: Bearer``; portal pages take the session
    cookie (and nothing else, so a stolen API token cannot drive the portal and
    vice versa).
    """

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        state: AuthState = connection.app.state.appliance
        if connection.route_handler.opt.get(PORTAL_OPT):
            try:
                info = await sync_to_thread(state.sessions.resolve, connection.cookies.get(COOKIE))
            except AuthenticationError as exc:
                raise LoginRequired(exc.message, reason=exc.code, next_path=connection.scope["path"]) from None
            connection.scope.setdefault("state", {})["portal_session"] = info
            return AuthenticationResult(user=info.principal, auth=info)
        origin = origin_of(connection)
        state.limiter.check(origin)
        try:
            principal = await sync_to_thread(state.identity.authenticate, bearer_of(connection))
        except AuthenticationError:
            state.limiter.fail(origin)
            raise
        return AuthenticationResult(user=principal, auth=principal.token_id)


async def _presented_csrf(connection: ASGIConnection) -> str | None:
    header = connection.headers.get(CSRF_HEADER)
    if header:
        return header
    if connection.headers.get("content-type", "").startswith("multipart/form-data"):
        # Uploads stream and are never parsed as forms; a form without
        # JavaScript carries the token in its action URL instead.
        return connection.query_params.get("csrf_token")
    if connection.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        from litestar import Request

        form = await Request(connection.scope, connection.receive).form()
        value = form.get("csrf_token")
        return value if isinstance(value, str) else None
    return None


async def csrf_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Portal requests that change anything must carry the session's CSRF token.

    Forms send it as the hidden field ``csrf_token``; scripts as the
    ``X-CSRF-Token`` header (uploads, which are never parsed as forms).
    """
    if not handler.opt.get(PORTAL_OPT) or connection.scope["method"] in _SAFE_METHODS:
        return
    info = connection.scope.get("state", {}).get("portal_session")
    state: AuthState = connection.app.state.appliance
    if info is None or not state.sessions.check_csrf(info, await _presented_csrf(connection)):
        raise PermissionDeniedError("missing or wrong CSRF token: reload the page and try again",
                                    code="csrf_failed", param="csrf_token")


def permission_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Allow the request only if the caller's role holds the handler's permission.

    Handlers without a declared permission are refused (fail closed), except
    the OpenAPI schema routes, which need only a valid token.
    """
    if handler.opt.get(PUBLIC_OPT):
        return
    if handler.opt.get(PORTAL_OPT) and handler.opt.get(PERMISSION_OPT) is None:
        return  # portal pages any logged-in user may see (home, log-out, role switch)
    principal: Principal | None = connection.user
    if principal is None:
        raise PermissionDeniedError("you hold no role yet: ask an administrator to grant you one", param="role")
    declared = handler.opt.get(PERMISSION_OPT)
    if declared is None:
        if getattr(handler, "http_methods", None) == {"OPTIONS"}:
            return  # Litestar's automatic OPTIONS answer lists allowed methods only
        if connection.scope["path"].startswith("/schema"):
            declared = Permission.SCHEMA_READ
        else:
            raise PermissionDeniedError("this route declares no permission and is closed")
    permission = Permission(declared)
    if not role_allows(principal.role, permission):
        raise PermissionDeniedError(
            f"role {principal.role.value!r} may not perform {permission.value!r}", param="role"
        )
