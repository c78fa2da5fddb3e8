"""HTTP routes for projects, users, tokens and the caller's own identity."""

from __future__ import annotations

from datetime import UTC

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from appliance.identity.roles import Permission, parse_role
from appliance.identity.schemas import (
    Grant,
    GrantCreate,
    ListOf,
    Me,
    MemberOut,
    ProjectCreate,
    ProjectOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
    UserCreate,
    UserOut,
)
from appliance.identity.service import IdentityService, Principal, TokenView
from appliance.web.context import audit_context
from appliance.web.openapi import error_responses


def _token_out(t: TokenView) -> TokenOut:
    return TokenOut(
        id=t.token_id, user=t.user, role=t.role, project=t.project, description=t.description,
        created_at=t.created_at, expires_at=t.expires_at, revoked_at=t.revoked_at,
    )


class MeController(Controller):
    path = "/api/v1/me"
    tags = ["identity"]

    @get(opt={"permission": Permission.SELF_READ}, sync_to_thread=False)
    def me(self, request: Request) -> Me:
        """Who the bearer token belongs to and what it may act as."""
        p: Principal = request.user
        return Me(user=p.user, role=p.role.value, project=p.project, token_id=p.token_id)


class ProjectController(Controller):
    path = "/api/v1/projects"
    tags = ["identity"]

    @get(opt={"permission": Permission.PROJECTS_READ}, sync_to_thread=True)
    def list_projects(self, request: Request, identity: NamedDependency[IdentityService]) -> ListOf:
        """Projects the caller can see: all for global roles, else its own."""
        return ListOf(data=[ProjectOut(p.name, p.created_at) for p in identity.list_projects(request.user)])

    @post(opt={"permission": Permission.PROJECTS_MANAGE}, responses=error_responses(409), sync_to_thread=True)
    def create_project(self, request: Request, identity: NamedDependency[IdentityService], data: JSONBody[ProjectCreate]) -> ProjectOut:
        p = identity.create_project(audit_context(request), data.name)
        return ProjectOut(p.name, p.created_at)

    @get("/{name:str}", opt={"permission": Permission.PROJECTS_READ}, sync_to_thread=True)
    def get_project(self, request: Request, identity: NamedDependency[IdentityService], name: FromPath[str]) -> ProjectOut:
        p = identity.get_project(request.user, name)
        return ProjectOut(p.name, p.created_at)

    @get("/{name:str}/members", opt={"permission": Permission.PROJECTS_READ}, sync_to_thread=True)
    def members(self, request: Request, identity: NamedDependency[IdentityService], name: FromPath[str]) -> ListOf:
        return ListOf(data=[MemberOut(u, r) for u, r in identity.project_members(request.user, name)])


class UserController(Controller):
    path = "/api/v1/users"
    tags = ["identity"]

    @get(opt={"permission": Permission.USERS_MANAGE}, sync_to_thread=True)
    def list_users(self, identity: NamedDependency[IdentityService]) -> ListOf:
        return ListOf(data=[UserOut(n, [Grant(r, p) for r, p in roles]) for n, roles in identity.list_users()])

    @post(opt={"permission": Permission.USERS_MANAGE}, responses=error_responses(409), sync_to_thread=True)
    def create_user(self, request: Request, identity: NamedDependency[IdentityService], data: JSONBody[UserCreate]) -> UserOut:
        u = identity.create_user(audit_context(request), data.name)
        return UserOut(u.name, [])

    @post("/{name:str}/roles", opt={"permission": Permission.USERS_MANAGE}, sync_to_thread=True)
    def grant(self, request: Request, identity: NamedDependency[IdentityService], name: FromPath[str], data: JSONBody[GrantCreate]) -> UserOut:
        identity.grant(audit_context(request), name, parse_role(data.role), data.project)
        roles = dict(identity.list_users())[name]
        return UserOut(name, [Grant(r, p) for r, p in roles])


class TokenController(Controller):
    path = "/api/v1/tokens"
    tags = ["identity"]

    @get(opt={"permission": Permission.TOKENS_MANAGE}, sync_to_thread=True)
    def list_tokens(self, identity: NamedDependency[IdentityService], user: FromQuery[str | None] = None) -> ListOf:
        return ListOf(data=[_token_out(t) for t in identity.list_tokens(user)])

    @post(opt={"permission": Permission.TOKENS_MANAGE}, sync_to_thread=True)
    def create_token(self, request: Request, identity: NamedDependency[IdentityService], data: JSONBody[TokenCreate]) -> TokenCreated:
        """Mint a token; its value is in this response only."""
        expires = data.expires_at
        if expires is not None and expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        view, value = identity.create_token(
            audit_context(request), data.user, parse_role(data.role), data.project,
            expires_at=expires, description=data.description,
        )
        out = _token_out(view)
        return TokenCreated(**{f: getattr(out, f) for f in out.__struct_fields__}, token=value)

    @delete("/{token_id:str}", opt={"permission": Permission.TOKENS_MANAGE}, status_code=200, sync_to_thread=True)
    def revoke_token(self, request: Request, identity: NamedDependency[IdentityService], token_id: FromPath[str]) -> TokenOut:
        return _token_out(identity.revoke_token(audit_context(request), token_id))
