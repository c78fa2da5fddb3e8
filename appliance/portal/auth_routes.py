"""Log-in, log-out, role switching and the start page."""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from litestar import Request, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromQuery
from litestar.response import Redirect, Template

from appliance.errors import AuthenticationError, RateLimitedError
from appliance.identity.auth import PUBLIC_OPT, origin_of
from appliance.portal.render import page, portal, session_of
from appliance.identity.sessions import COOKIE
from appliance.web.context import audit_context
from appliance.services import AppState

LOGIN_CSRF_COOKIE = "appliance_login_csrf"
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


def _safe_next(target: str | None) -> str:
    """Only same-site paths: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _cookie(state: AppState, key: str, value: str, *, max_age: int | None) -> Cookie:
    return Cookie(key=key, value=value, httponly=True, secure=state.settings.portal.cookie_secure,
                  samesite="strict", path="/", max_age=max_age)


def _login_page(request: Request, state: AppState, *, next_path: str, error: str | None = None,
                username: str = "", status_code: int = 200) -> Template:
    token = secrets.token_urlsafe(32)
    response = page(request, "login.html", title="Log in", login_csrf=token, next=next_path, error=error,
                    username=username, status_code=status_code)
    response.cookies.append(_cookie(state, LOGIN_CSRF_COOKIE, token, max_age=3600))
    return response


@get("/login", opt={PUBLIC_OPT: True}, include_in_schema=False, sync_to_thread=False)
def login_form(request: Request, appliance: NamedDependency[AppState], next: FromQuery[str | None] = None) -> Template:
    return _login_page(request, appliance, next_path=_safe_next(next))


#: A browser that has logged in to an account before carries this cookie (OWASP's "device cookie"):
#: its attempts on that account count on their own, so failures of others (an attacker guessing that
#: account, or anyone behind the same address) never hold up its owner's correct password.
DEVICE_COOKIE = "appliance_device"
DEVICE_MAX_AGE_S = 90 * 24 * 3600
#: Signs device cookies. Per process: after a restart old cookies no longer count, and their holders
#: are judged by their address like anyone else until they log in again.
_DEVICE_KEY = secrets.token_bytes(32)


def _device_sign(username: str, device: str) -> str:
    return hmac.new(_DEVICE_KEY, f"{username}\x00{device}".encode(), "sha256").hexdigest()[:32]


def _device_of(request: Request, username: str) -> str | None:
    """This browser's device id for ``username``, when it carries a valid device cookie for that account."""
    device, _, mac = request.cookies.get(DEVICE_COOKIE, "").partition(".")
    if device and mac and hmac.compare_digest(mac, _device_sign(username, device)):
        return device
    return None


def _login_keys(username: str, origin: str, device: str | None) -> list[tuple]:
    """What a log-in attempt's failures count against (see :class:`appliance.identity.auth.FailureLimiter`).

    A known device: only itself. Anyone else: the account from this address, the account from anywhere
    (slow guessing from many addresses) and this address across accounts (spraying).
    """
    if device is not None:
        return [("device", username, device)]
    return [("login", username, origin), ("account", username), ("login-addr", origin)]


@post("/login", opt={PUBLIC_OPT: True}, include_in_schema=False, sync_to_thread=True)
def login(request: Request, appliance: NamedDependency[AppState], data: Form) -> Template | Redirect:
    """Check the double-submit CSRF cookie, then the throttle, then the password."""
    next_path = _safe_next(data.get("next"))
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie, data.get("csrf_token", "")):
        return _login_page(request, appliance, next_path=next_path, status_code=403,
                           error="The form expired or was not sent by this page; please try again.")
    origin = origin_of(request)
    username = data.get("username", "")[:128]
    device = _device_of(request, username)
    keys = _login_keys(username, origin, device)
    try:
        appliance.limiter.check(*keys)  # before the password: passwords can be guessed
        token = appliance.sessions.login(username, data.get("password", ""), origin)
    except RateLimitedError as exc:
        _audit_throttled(appliance, username, origin, exc)
        page_ = _login_page(request, appliance, next_path=next_path, error=exc.message, status_code=429)
        page_.headers["Retry-After"] = str(exc.retry_after_s)
        return page_
    except AuthenticationError:
        appliance.limiter.fail(*keys)
        return _login_page(request, appliance, next_path=next_path, error="Wrong username or password.",
                           username=username[:64], status_code=401)
    appliance.limiter.succeed(keys[0])
    response = Redirect(next_path, status_code=303)
    response.cookies.append(_cookie(appliance, COOKIE, token, max_age=appliance.settings.portal.session_max_hours * 3600))
    response.cookies.append(Cookie(key=LOGIN_CSRF_COOKIE, value="", max_age=0, path="/"))
    device = device or secrets.token_urlsafe(12)
    response.cookies.append(_cookie(appliance, DEVICE_COOKIE, f"{device}.{_device_sign(username, device)}",
                                    max_age=DEVICE_MAX_AGE_S))
    return response


def _audit_throttled(appliance: AppState, username: str, origin: str, exc: RateLimitedError) -> None:
    from appliance.audit.service import AuditContext, record

    # A known user's projects each get the event (their auditors watch attempts on their members);
    # an unknown name stays out of the log, as a failed log-in's does.
    projects = appliance.sessions.known_user_projects(username) if username else None
    with appliance.db.transaction() as s:
        for project in projects or [None]:
            record(s, AuditContext("anonymous", "password", origin), "auth.rate_limited", outcome="denied",
                   resource_type="user", resource_id=username[:64] if projects is not None else None,
                   project=project, reason=f"log-in attempt held back {exc.retry_after_s} s after repeated failures")


@post("/logout", opt=portal(), include_in_schema=False, sync_to_thread=True)
def logout(request: Request, appliance: NamedDependency[AppState]) -> Redirect:
    appliance.sessions.logout(request.cookies.get(COOKIE), _ctx(request))
    response = Redirect("/login", status_code=303)
    response.cookies.append(Cookie(key=COOKIE, value="", max_age=0, path="/"))
    return response


def _ctx(request: Request):
    info = session_of(request)
    if info.principal is not None:
        return audit_context(request)
    from appliance.audit.service import AuditContext

    return AuditContext(actor=info.user, auth_method="session", origin_ip=origin_of(request))


@post("/role", opt=portal(), include_in_schema=False, sync_to_thread=True)
def switch_role(request: Request, appliance: NamedDependency[AppState], data: Form) -> Redirect:
    try:
        binding = int(data.get("binding", ""))
    except ValueError:
        binding = -1
    appliance.sessions.switch(request.cookies.get(COOKIE), binding, _ctx(request))
    return Redirect("/", status_code=303)


@get("/", opt=portal(), include_in_schema=False, sync_to_thread=True)
def home(request: Request, appliance: NamedDependency[AppState]) -> Template:
    principal = session_of(request).principal
    counts = {"files": 0, "jobs": 0, "models": 0}
    if principal is not None:
        counts["files"], counts["jobs"] = appliance.files.count(principal), appliance.jobs.count(principal)
        counts["models"] = len(appliance.catalog.list_base_models()) + len(appliance.catalog.list_adapters(principal))
    return page(request, "home.html", title="Start", counts=counts)


ROUTES = [login_form, login, logout, switch_role, home]
