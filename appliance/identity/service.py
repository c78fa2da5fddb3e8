"""Projects, users, role bindings and tokens: every change audited in its transaction."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.errors import (
    AuthenticationError,
    ConflictError,
    CrossProjectDenied,
    InvalidRequestError,
    NotFoundError,
)
from appliance.identity import tokens
from appliance.identity.models import ApiToken, Project, RoleBinding, User
from appliance.identity.roles import GLOBAL_CAPABLE_ROLES, GLOBAL_ONLY_ROLES, Role

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_name(value: str, *, param: str) -> str:
    """A project or user name: lower-case letters, digits, ``.``, ``_``, ``-``; 1-64 chars."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidRequestError(
            f"`{param}` must be 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter "
            f"or digit; got {value!r}",
            param=param,
        )
    return value


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: one user acting in one role, in one project or globally."""

    user_id: int
    user: str
    role: Role
    project_id: int | None
    project: str | None
    auth_method: str
    token_id: str | None = None

    @property
    def is_global(self) -> bool:
        return self.project_id is None

    def audit_context(self, origin_ip: str | None = None, request_id: str | None = None) -> AuditContext:
        return AuditContext(
            actor=self.user, auth_method=self.auth_method, origin_ip=origin_ip, request_id=request_id
        )

    def check_project(self, project_id: int, *, resource: str) -> None:
        """Raise :class:`CrossProjectDenied` unless the caller may see ``project_id``'s objects."""
        if self.project_id is not None and self.project_id != project_id:
            raise CrossProjectDenied(f"{resource} not found")


@dataclass(frozen=True)
class TokenView:
    """A token as listed: never the secret."""

    token_id: str
    user: str
    role: str
    project: str | None
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


def project_by_id(s: Session, project_id: int) -> Project:
    """The project a row of another package points at (its ``project_id``), in the caller's transaction."""
    return s.get(Project, project_id)


def project_name(s: Session, project_id: int) -> str:
    return project_by_id(s, project_id).name


def project_names(s: Session, project_ids: set[int]) -> dict[int, str]:
    """Project id -> name for the ids given (one query)."""
    if not project_ids:
        return {}
    return dict(s.execute(select(Project.id, Project.name).where(Project.id.in_(project_ids))).all())


def project_named(s: Session, name: str) -> Project | None:
    return s.scalar(select(Project).where(Project.name == name))


def all_projects(s: Session) -> list[Project]:
    """Every project, by name."""
    return list(s.scalars(select(Project).order_by(Project.name)))


def has_users(s: Session) -> bool:
    return (s.scalar(select(func.count()).select_from(User)) or 0) > 0


def create_first_admin(s: Session, name: str) -> tokens.IssuedToken:
    """The first admin and its token, in the caller's transaction; the token to show.

    ``appliance init`` audits both.
    """
    issued = tokens.mint()
    admin = User(name=name)
    s.add(admin)
    s.flush()
    s.add(RoleBinding(user_id=admin.id, role=Role.ADMIN.value, project_id=None))
    s.add(ApiToken(
        token_id=issued.token_id, secret_hash=issued.secret_hash, user_id=admin.id,
        role=Role.ADMIN.value, project_id=None, description="created by appliance init",
    ))
    return issued


def _token_view(t: ApiToken) -> TokenView:
    return TokenView(
        token_id=t.token_id,
        user=t.user.name,
        role=t.role,
        project=t.project.name if t.project else None,
        description=t.description,
        created_at=t.created_at,
        expires_at=t.expires_at,
        revoked_at=t.revoked_at,
    )


def _flush_unique(s: Session, conflict: str) -> None:
    """Flush a new named row; a name taken meanwhile by a concurrent transaction is a conflict.

    SQLite serialises writers, so the check before the insert sees every name;
    on PostgreSQL two transactions can both pass it and the unique index decides.
    """
    try:
        s.flush()
    except IntegrityError:
        raise ConflictError(conflict, param="name") from None


class IdentityService:
    """Create and look up projects, users, grants and tokens; authenticate bearers."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- projects ---------------------------------------------------------
    def create_project(self, ctx: AuditContext, name: str) -> Project:
        check_name(name, param="name")
        with self.db.transaction() as s:
            if s.scalar(select(Project).where(Project.name == name)) is not None:
                raise ConflictError(f"project {name!r} already exists", param="name")
            project = Project(name=name)
            s.add(project)
            _flush_unique(s, f"project {name!r} already exists")
            record(s, ctx, "project.create", resource_type="project", resource_id=name, project=name)
            return project

    def list_projects(self, principal: Principal | None) -> list[Project]:
        """Projects ``principal`` may see; all of them for ``None`` (the host CLI)."""
        with self.db.read() as s:
            stmt = select(Project).order_by(Project.name)
            if principal is not None and not principal.is_global:
                stmt = stmt.where(Project.id == principal.project_id)
            return list(s.scalars(stmt))

    def get_project(self, principal: Principal | None, name: str) -> Project:
        """The project called ``name``; another project's answers like a missing one."""
        with self.db.read() as s:
            project = s.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise NotFoundError(f"project {name!r} not found", param="project")
        if principal is not None:
            principal.check_project(project.id, resource=f"project {name!r}")
        return project

    def project_members(self, principal: Principal, name: str) -> list[tuple[str, str]]:
        """``(user, role)`` pairs bound in project ``name``."""
        project = self.get_project(principal, name)
        with self.db.read() as s:
            rows = s.execute(
                select(User.name, RoleBinding.role)
                .join(RoleBinding, RoleBinding.user_id == User.id)
                .where(RoleBinding.project_id == project.id)
                .order_by(User.name, RoleBinding.role)
            ).all()
        return [(u, r) for u, r in rows]

    # -- users and grants -------------------------------------------------
    def create_user(self, ctx: AuditContext, name: str) -> User:
        check_name(name, param="name")
        with self.db.transaction() as s:
            if s.scalar(select(User).where(User.name == name)) is not None:
                raise ConflictError(f"user {name!r} already exists", param="name")
            user = User(name=name)
            s.add(user)
            _flush_unique(s, f"user {name!r} already exists")
            record(s, ctx, "user.create", resource_type="user", resource_id=name)
            return user

    def list_users(self) -> list[tuple[str, list[tuple[str, str | None]]]]:
        """Every user with its ``(role, project)`` bindings."""
        with self.db.read() as s:
            users = s.scalars(select(User).order_by(User.name)).all()
            return [
                (u.name, sorted((b.role, b.project.name if b.project else None) for b in u.bindings))
                for u in users
            ]

    def _user(self, s: Session, name: str, param: str = "user") -> User:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFoundError(f"user {name!r} not found", param=param)
        return user

    def _project(self, s: Session, name: str | None) -> Project | None:
        if name is None:
            return None
        project = s.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise NotFoundError(f"project {name!r} not found; create it with `appliance projects add {name}`", param="project")
        return project

    @staticmethod
    def _check_scope(role: Role, project: str | None) -> None:
        if role in GLOBAL_ONLY_ROLES and project is not None:
            raise InvalidRequestError(f"role {role.value!r} is global; omit `project` (got {project!r})", param="project")
        if role not in GLOBAL_CAPABLE_ROLES and project is None:
            raise InvalidRequestError(f"role {role.value!r} needs a `project`", param="project")

    def grant(self, ctx: AuditContext, user: str, role: Role, project: str | None) -> None:
        """Bind ``user`` to ``role`` in ``project`` (``None``: globally)."""
        self._check_scope(role, project)
        with self.db.transaction() as s:
            u = self._user(s, user)
            p = self._project(s, project)
            pid = p.id if p else None
            if any(b.role == role.value and b.project_id == pid for b in u.bindings):
                return  # already granted: idempotent, nothing to audit
            s.add(RoleBinding(user_id=u.id, role=role.value, project_id=pid))
            record(
                s, ctx, "role.grant", resource_type="user", resource_id=user, project=project,
                details={"role": role.value},
            )

    # -- tokens -----------------------------------------------------------
    def create_token(
        self,
        ctx: AuditContext,
        user: str,
        role: Role,
        project: str | None,
        *,
        expires_at: datetime | None = None,
        description: str = "",
    ) -> tuple[TokenView, str]:
        """Mint a token for ``user`` acting as ``role`` in ``project``.

        Returns:
            The token's listing view and the token value, which is shown once
            and never stored.
        """
        self._check_scope(role, project)
        if expires_at is not None and expires_at <= utcnow():
            raise InvalidRequestError(f"`expires_at` must be in the future; got {expires_at.isoformat()}", param="expires_at")
        if len(description) > 200:
            raise InvalidRequestError(f"`description` must be at most 200 characters; got {len(description)}", param="description")
        with self.db.transaction() as s:
            u = self._user(s, user)
            p = self._project(s, project)
            pid = p.id if p else None
            if not any(b.role == role.value and b.project_id == pid for b in u.bindings):
                scope = f"in project {project!r}" if project else "globally"
                hint = f" --project {project}" if project else ""
                raise InvalidRequestError(
                    f"user {user!r} does not hold role {role.value!r} {scope}; grant it first with "
                    f"`appliance users grant {user} --role {role.value}{hint}`",
                    param="role",
                )
            issued = tokens.mint()
            row = ApiToken(
                token_id=issued.token_id, secret_hash=issued.secret_hash, user_id=u.id, role=role.value,
                project_id=pid, description=description, expires_at=expires_at,
            )
            s.add(row)
            s.flush()
            record(
                s, ctx, "token.create", resource_type="token", resource_id=issued.token_id, project=project,
                details={"user": user, "role": role.value, "expires_at": expires_at.isoformat() if expires_at else None},
            )
            s.refresh(row)
            return _token_view(row), issued.value

    def list_tokens(self, user: str | None = None) -> list[TokenView]:
        with self.db.read() as s:
            stmt = select(ApiToken).order_by(ApiToken.created_at)
            if user is not None:
                stmt = stmt.where(ApiToken.user_id == self._user(s, user).id)
            return [_token_view(t) for t in s.scalars(stmt)]

    def revoke_token(self, ctx: AuditContext, token_id: str) -> TokenView:
        with self.db.transaction() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_id == token_id).with_for_update(of=ApiToken))
            if row is None:
                raise NotFoundError(f"token {token_id!r} not found", param="token_id")
            if row.revoked_at is None:  # locked: two revokes at once audit one revocation
                row.revoked_at = utcnow()
                record(
                    s, ctx, "token.revoke", resource_type="token", resource_id=token_id,
                    project=row.project.name if row.project else None,
                )
            return _token_view(row)

    # -- authentication ---------------------------------------------------
    def authenticate(self, bearer: str | None) -> Principal:
        """The principal behind a bearer token value, or :class:`AuthenticationError`.

        Errors carry the token id (public) at most, never the value. Whether a
        token is revoked or expired is only told to a caller who holds its
        secret.
        """
        if bearer == "":
            raise AuthenticationError(
                "malformed Authorization header: use the Bearer scheme with an appliance token",
                code="token_malformed",
            )
        if bearer is None:
            raise AuthenticationError(
                "missing bearer token: send `Authorization: Bearer <token>`", code="token_missing"
            )
        parsed = tokens.parse(bearer)
        if parsed is None:
            raise AuthenticationError("malformed bearer token", code="token_malformed")
        token_id, secret = parsed
        with self.db.read() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_id == token_id))
            if row is None or not tokens.secret_matches(secret, row.secret_hash):
                raise AuthenticationError("invalid bearer token", code="token_invalid", param=None) from None
            if row.revoked_at is not None:
                raise TokenRejected("token has been revoked", code="token_revoked", token_id=token_id, user=row.user.name)
            if row.expires_at is not None and row.expires_at <= utcnow():
                raise TokenRejected("token has expired", code="token_expired", token_id=token_id, user=row.user.name)
            if row.user.disabled:
                raise TokenRejected("user is disabled", code="user_disabled", token_id=token_id, user=row.user.name)
            # The grant may have been withdrawn since the token was minted.
            if not any(b.role == row.role and b.project_id == row.project_id for b in row.user.bindings):
                raise TokenRejected(
                    "token's role is no longer granted", code="role_withdrawn", token_id=token_id, user=row.user.name
                )
            return Principal(
                user_id=row.user_id,
                user=row.user.name,
                role=Role(row.role),
                project_id=row.project_id,
                project=row.project.name if row.project else None,
                auth_method=f"token:{token_id}",
                token_id=token_id,
            )


class TokenRejected(AuthenticationError):
    """A genuine token that may no longer be used; carries who it belonged to for the audit."""

    def __init__(self, message: str, *, code: str, token_id: str, user: str) -> None:
        super().__init__(message, code=code)
        self.token_id = token_id
        self.user = user
