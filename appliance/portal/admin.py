"""Admin: users and their roles and passwords, tokens, projects and policies."""

from __future__ import annotations

from typing import Annotated

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Template

from appliance.errors import ApplianceError
from appliance.files.service import FileService
from appliance.identity.roles import Permission, Role, parse_role
from appliance.portal.render import page, portal
from appliance.web.context import audit_context
from appliance.services import AppState

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


def _admin_page(request: Request, appliance: AppState, *, flashes: list[tuple[str, str]] | None = None,
                new_token: str | None = None, status_code: int = 200) -> Template:
    projects = appliance.identity.list_projects(None)
    policies = {p.name: appliance.files.policies.describe(p) for p in projects}
    return page(request, "admin.html", section="admin", title="Admin", users=appliance.identity.list_users(),
                tokens=appliance.identity.list_tokens(), projects=projects, policies=policies,
                roles=[r.value for r in Role], flashes=flashes or [], new_token=new_token, status_code=status_code)


@get("/admin", opt=portal(Permission.USERS_MANAGE), include_in_schema=False, sync_to_thread=True)
def admin(request: Request, appliance: NamedDependency[AppState]) -> Template:
    return _admin_page(request, appliance)


@post("/admin", opt=portal(Permission.USERS_MANAGE), include_in_schema=False, sync_to_thread=True)
def admin_action(request: Request, appliance: NamedDependency[AppState], files: NamedDependency[FileService],
                 data: Form) -> Template:
    """One endpoint for the page's forms, told apart by ``action``; errors are shown on the page."""
    ctx = audit_context(request)
    action = data.get("action", "")
    identity = appliance.identity
    new_token = None
    try:
        project = data.get("project") or None
        if action == "create_project":
            identity.create_project(ctx, data.get("name", ""))
            message = f"Project {data.get('name')} created."
        elif action == "create_user":
            identity.create_user(ctx, data.get("name", ""))
            if data.get("password"):
                appliance.sessions.set_password(ctx, data["name"], data["password"])
            if data.get("role"):
                identity.grant(ctx, data["name"], parse_role(data["role"]), project)
            message = f"User {data.get('name')} created."
        elif action == "grant":
            identity.grant(ctx, data.get("user", ""), parse_role(data.get("role", "")), project)
            message = f"Granted {data.get('role')} to {data.get('user')}."
        elif action == "set_password":
            appliance.sessions.set_password(ctx, data.get("user", ""), data.get("password", ""))
            message = f"Password of {data.get('user')} set; their sessions were ended."
        elif action == "create_token":
            view, new_token = identity.create_token(ctx, data.get("user", ""), parse_role(data.get("role", "")),
                                                    project, description=data.get("description", ""))
            message = f"Token {view.token_id} created. Copy it now: it is not shown again."
        elif action == "revoke_token":
            identity.revoke_token(ctx, data.get("token_id", ""))
            message = f"Token {data.get('token_id')} revoked."
        elif action == "set_policy":
            target = identity.get_project(None, data.get("project", ""))
            eff = files.policies.set(ctx, target, data.get("text", ""))
            message = f"Policy of {target.name} saved ({eff.policy.content_hash[:19]}…)."
        else:
            message = None
            return _admin_page(request, appliance, flashes=[("error", f"unknown action {action!r}")], status_code=400)
    except ApplianceError as exc:
        return _admin_page(request, appliance, flashes=[("error", exc.message)], status_code=400)
    return _admin_page(request, appliance, flashes=[("ok", message)], new_token=new_token)


ROUTES = [admin, admin_action]
