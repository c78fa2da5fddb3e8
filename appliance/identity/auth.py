"""Bearer authentication, the failure rate limiter and the permission guard."""

from __future__ import annotations

import threading
import time
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
    """Failed authentications counted per key, answered with exponential back-off; never a valid credential.

    A key is whatever a failure is pinned on: an address (``("addr", ip)``), a token id, an account
    and the address it is tried from, an account anywhere. Once a key has ``max_failures`` failures,
    each counted within ``window_s`` of the one before, it is *locked* for 1 s, then 2, 4... up to
    ``max_backoff_s`` with every further failure; ``window_s`` after its last failure it is forgotten.

    What a lock refuses is the caller's choice: the API verifies every bearer token and answers 429
    instead of 401 only for a wrong one (a token is 256 random bits: no one guesses it, so a valid
    token is never refused, whoever else fails from the same address); the log-in form checks its
    keys *before* the password, since passwords can be guessed (:func:`appliance.portal.auth_routes.login`).
    """

    #: Keys of these kinds lock only after this many times ``max_failures``: an address trying many accounts
    #: (password spraying) is held back late, since people behind one NAT share it.
    SCALE = {"login-addr": 5}

    def __init__(self, max_failures: int, window_s: float, clock=time.monotonic, max_backoff_s: float = 900.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._failures: dict[tuple, tuple[int, float]] = {}  # key -> (count, time of the last failure)
        self._lock = threading.Lock()

    def _live(self, key: tuple, now: float) -> tuple[int, float]:
        count, last = self._failures.get(key, (0, 0.0))
        if count and now - last > self.window_s:
            del self._failures[key]
            return 0, 0.0
        return count, last

    def retry_after(self, key: tuple) -> int:
        """Seconds until ``key`` may try again; 0 when it is not locked."""
        with self._lock:
            now = self._clock()
            count, last = self._live(key, now)
            limit = self.max_failures * self.SCALE.get(key[0], 1)
            if count < limit:
                return 0
            wait = last + min(self.max_backoff_s, 2.0 ** (count - limit)) - now
            return max(0, int(wait + 0.999))

    def check(self, *keys: tuple) -> None:
        """Raise :class:`RateLimitedError` when one of ``keys`` is locked."""
        wait = max((self.retry_after(k) for k in keys), default=0)
        if wait:
            raise RateLimitedError(f"too many failed authentication attempts; retry in {wait} s", retry_after_s=wait)

    def fail(self, *keys: tuple) -> None:
        with self._lock:
            now = self._clock()
            for key in keys:
                count, _ = self._live(key, now)
                self._failures[key] = (count + 1, now)
        if len(self._failures) > 100_000:  # a flood of distinct keys: keep memory bounded
            with self._lock:
                now = self._clock()
                for key in [k for k, (_, last) in self._failures.items() if now - last > self.window_s]:
                    del self._failures[key]

    def succeed(self, *keys: tuple) -> None:
        """Forget ``keys``' failures (a correct password from the account's own address)."""
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


def origin_of(connection: ASGIConnection) -> str:
    return connection.client.host if connection.client else "unknown"


def token_id_of(bearer: str | None) -> str | None:
    """The public id part of an appliance token (``apl_<id>_<secret>``), if it has that shape."""
    parts = (bearer or "").split("_", 2)
    return parts[1] if len(parts) == 3 and parts[0] == "apl" and parts[1] else None


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
        presented = bearer_of(connection)
        try:
            principal = await sync_to_thread(state.identity.authenticate, presented)
        except AuthenticationError:
            # Every token is checked, so a valid one always passes, whatever others behind the same address
            # do; a wrong one from an address (or for a token id) that keeps failing waits, with back-off.
            keys = [("addr", origin), *([("token", tid)] if (tid := token_id_of(presented)) else [])]
            state.limiter.check(*keys)
            state.limiter.fail(*keys)
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
