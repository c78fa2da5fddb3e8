"""``appliance projects``, ``users`` and ``tokens``: identity and access (see ``appliance.identity``)."""

from __future__ import annotations

import re
import sys

import click

from appliance.bootstrap import open_initialized
from appliance.cli.common import _ctx, _identity, _settings, handle_errors, parse_duration
from appliance.db.base import utcnow
from appliance.errors import InvalidRequestError
from appliance.identity.roles import Role, parse_role

ROLE_CHOICE = click.Choice([r.value for r in Role])


# -- projects -------------------------------------------------------------
@click.group()
def projects() -> None:
    """Manage projects (tenants)."""


@projects.command("add")
@click.argument("name")
@handle_errors
def projects_add(name: str) -> None:
    """Create project NAME."""
    _identity(_settings()).create_project(_ctx(), name)
    click.echo(f"created project {name}")


@projects.command("list")
@handle_errors
def projects_list() -> None:
    for p in _identity(_settings()).list_projects(None):
        click.echo(p.name)


# -- users ----------------------------------------------------------------
@click.group()
def users() -> None:
    """Manage users and their roles."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, help="Grant this role as well.")
@click.option("--project", help="Project the role applies to (omit for admin / global auditor).")
@handle_errors
def users_add(name: str, role: str | None, project: str | None) -> None:
    """Create user NAME, optionally granting a role."""
    service = _identity(_settings())
    if role is None and project is not None:
        raise InvalidRequestError("`--project` needs `--role`", param="--project")
    service.create_user(_ctx(), name)
    if role is not None:
        service.grant(_ctx(), name, parse_role(role, param="--role"), project)
    click.echo(f"created user {name}" + (f" with role {role}" + (f" in {project}" if project else "") if role else ""))


@users.command("grant")
@click.argument("name")
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--project", help="Project the role applies to (omit for admin / global auditor).")
@handle_errors
def users_grant(name: str, role: str, project: str | None) -> None:
    """Grant user NAME a role."""
    _identity(_settings()).grant(_ctx(), name, parse_role(role, param="--role"), project)
    click.echo(f"granted {role} to {name}" + (f" in {project}" if project else ""))


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
@handle_errors
def users_passwd(name: str, password_stdin: bool) -> None:
    """Set NAME's portal password (12+ characters); ends their sessions."""
    from appliance.identity.sessions import SessionService

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = _settings()
    SessionService(open_initialized(settings)).set_password(_ctx(), name, password)
    click.echo(f"password of {name} set")


@users.command("list")
@handle_errors
def users_list() -> None:
    for name, grants in _identity(_settings()).list_users():
        roles = ", ".join(f"{r}@{p}" if p else r for r, p in grants) or "-"
        click.echo(f"{name:<24} {roles}")


# -- tokens ---------------------------------------------------------------
@click.group()
def tokens() -> None:
    """Manage API tokens."""


@tokens.command("create")
@click.option("--user", "user", required=True)
@click.option("--role", type=ROLE_CHOICE, required=True)
@click.option("--project", help="Project the token acts in (omit for admin / global auditor).")
@click.option("--expires-in", help="Lifetime such as 90d, 12h; default: no expiry.")
@click.option("--description", default="", help="Free text shown in token lists.")
@handle_errors
def tokens_create(user: str, role: str, project: str | None, expires_in: str | None, description: str) -> None:
    """Mint a token; prints only the token on stdout (shown once)."""
    expires_at = utcnow() + parse_duration(expires_in, param="--expires-in") if expires_in else None
    view, value = _identity(_settings()).create_token(
        _ctx(), user, parse_role(role, param="--role"), project, expires_at=expires_at, description=description
    )
    click.echo(value)
    click.echo(f"token {view.token_id} created for {user} ({role}); it is not shown again", err=True)


@tokens.command("revoke")
@click.argument("token_id")
@handle_errors
def tokens_revoke(token_id: str) -> None:
    """Revoke a token by its id (the part after ``apl_``, or the whole token)."""
    match = re.match(r"^(?:apl_)?([0-9a-f]{12})(?:_.*)?$", token_id)
    if not match:
        raise InvalidRequestError(f"`TOKEN_ID` must be 12 hex characters; got {token_id[:16]!r}", param="TOKEN_ID")
    view = _identity(_settings()).revoke_token(_ctx(), match.group(1))
    click.echo(f"revoked token {view.token_id} of {view.user}")


@tokens.command("list")
@click.option("--user", default=None)
@handle_errors
def tokens_list(user: str | None) -> None:
    now = utcnow()
    for t in _identity(_settings()).list_tokens(user):
        if t.revoked_at:
            status = "revoked"
        elif t.expires_at and t.expires_at <= now:
            status = "expired"
        else:
            status = "active"
        expires = t.expires_at.strftime("%Y-%m-%d %H:%M") if t.expires_at else "never"
        click.echo(f"{t.token_id}  {t.user:<16} {t.role:<10} {t.project or '-':<16} {status:<8} expires {expires}")
