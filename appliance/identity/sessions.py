"""Log-in, sessions and role switching for the portal.

The cookie holds a random 256-bit session id; the database keeps only its
SHA-256, the CSRF token, and which of the user's role bindings the session
acts in. Sessions end on log-out, after an idle period, or after an absolute
lifetime.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.errors import AuthenticationError, InvalidRequestError, NotFoundError
from appliance.identity.models import PortalSession, Project, RoleBinding, User
from appliance.identity.passwords import check_strength, hash_password, verify_password
from appliance.identity.roles import Role
from appliance.identity.service import Principal

COOKIE = "appliance_session"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Binding:
    id: int
    role: str
    project: str | None

    @property
    def label(self) -> str:
        return f"{self.role} @ {self.project}" if self.project else f"{self.role} (all projects)"


@dataclass(frozen=True)
class SessionInfo:
    """A live session as the portal uses it."""

    principal: Principal | None  # None: the user holds no role yet
    user: str
    csrf_token: str
    bindings: list[Binding]
    binding_id: int | None


class SessionService:
    """Portal authentication.

    Args:
        db: The database.
        idle_minutes: A session unused this long ends.
        max_hours: No session lives longer than this.
    """

    def __init__(self, db: Database, *, idle_minutes: int = 30, max_hours: int = 12) -> None:
        self.db = db
        self.idle = timedelta(minutes=idle_minutes)
        self.max_age = timedelta(hours=max_hours)

    # -- passwords ------------------------------------------------------------
    def set_password(self, ctx: AuditContext, user: str, password: str) -> None:
        check_strength(password)
        with self.db.transaction() as s:
            row = s.scalar(select(User).where(User.name == user))
            if row is None:
                raise NotFoundError(f"user {user!r} not found", param="user")
            row.password_hash = hash_password(password)
            # A new password ends every session of the user.
            for sess in s.scalars(select(PortalSession).where(PortalSession.user_id == row.id,
                                                              PortalSession.revoked_at.is_(None))):
                sess.revoked_at = utcnow()
            record(s, ctx, "user.password", resource_type="user", resource_id=user)

    # -- sessions -------------------------------------------------------------
    def login(self, username: str, password: str, origin_ip: str | None) -> str:
        """A new session's cookie value; :class:`AuthenticationError` (audited) otherwise."""
        ctx = AuditContext(actor=username[:64] if username else "anonymous", auth_method="password",
                           origin_ip=origin_ip)
        with self.db.read() as s:
            user = s.scalar(select(User).where(User.name == username))
        ok = verify_password(password, user.password_hash if user else None)
        if not ok or user is None or user.disabled:
            with self.db.transaction() as s:
                if user is None:  # an unknown name: not recorded as a name (it may be a mistyped password)
                    record(s, AuditContext("anonymous", "password", origin_ip), "portal.login",
                           outcome="denied", reason="wrong username or password")
                else:
                    self._audit_failed_login(s, ctx, user, "account disabled" if ok and user.disabled
                                             else "wrong username or password")
            raise AuthenticationError("wrong username or password", code="login_failed")
        token = secrets.token_urlsafe(32)
        with self.db.transaction() as s:
            bindings = self._bindings(s, user.id)
            now = utcnow()
            s.add(PortalSession(
                id_hash=_hash(token), user_id=user.id, binding_id=bindings[0].id if bindings else None,
                csrf_token=secrets.token_urlsafe(32), created_at=now, last_seen_at=now,
                expires_at=now + self.max_age, origin_ip=origin_ip,
            ))
            record(s, AuditContext(user.name, f"session:{_hash(token)[:12]}", origin_ip), "portal.login",
                   resource_type="user", resource_id=user.name)
        return token

    def _audit_failed_login(self, s, ctx: AuditContext, user: User, reason: str) -> None:
        """One denied ``portal.login`` per project the user works in, so each project's auditor sees
        attempts on its members' accounts; one without a project for a user bound to none (or only
        to appliance-wide roles)."""
        for project in self.projects_of(s, user.id) or [None]:
            record(s, ctx, "portal.login", outcome="denied", resource_type="user", resource_id=user.name,
                   project=project, reason=reason)

    def projects_of(self, s, user_id: int) -> list[str]:
        """The projects ``user_id`` has a role in, sorted (appliance-wide roles name none)."""
        return sorted({b.project for b in self._bindings(s, user_id) if b.project is not None})

    def known_user_projects(self, username: str) -> list[str] | None:
        """The projects of the user called ``username``; ``None`` when there is no such user."""
        with self.db.read() as s:
            user = s.scalar(select(User).where(User.name == username))
            return None if user is None else self.projects_of(s, user.id)

    def _bindings(self, s, user_id: int) -> list[Binding]:
        rows = s.execute(select(RoleBinding, Project.name).outerjoin(Project, Project.id == RoleBinding.project_id)
                         .where(RoleBinding.user_id == user_id).order_by(RoleBinding.id)).all()
        return [Binding(b.id, b.role, p) for b, p in rows]

    def resolve(self, token: str | None) -> SessionInfo:
        """The live session behind a cookie value, or :class:`AuthenticationError`."""
        if not token:
            raise AuthenticationError("not logged in", code="session_missing")
        now = utcnow()
        with self.db.transaction() as s:
            sess = s.get(PortalSession, _hash(token))
            if sess is None or sess.revoked_at is not None:
                raise AuthenticationError("not logged in", code="session_invalid")
            if now >= sess.expires_at or now - sess.last_seen_at >= self.idle:
                sess.revoked_at = now
                raise AuthenticationError("your session has expired; log in again", code="session_expired")
            if now - sess.last_seen_at > timedelta(seconds=60):
                sess.last_seen_at = now  # coarse, to avoid a write per request
            user = s.get(User, sess.user_id)
            if user is None or user.disabled:
                raise AuthenticationError("not logged in", code="session_invalid")
            bindings = self._bindings(s, user.id)
            active = next((b for b in bindings if b.id == sess.binding_id), None)
            principal = None
            if active is not None:
                project_id = s.scalar(select(Project.id).where(Project.name == active.project)) if active.project \
                    else None
                principal = Principal(user_id=user.id, user=user.name, role=Role(active.role),
                                      project_id=project_id, project=active.project,
                                      auth_method=f"session:{sess.id_hash[:12]}")
            return SessionInfo(principal, user.name, sess.csrf_token, bindings, active.id if active else None)

    def check_csrf(self, info: SessionInfo, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(presented.encode(), info.csrf_token.encode())

    def switch(self, token: str, binding_id: int, ctx: AuditContext) -> None:
        with self.db.transaction() as s:
            sess = s.get(PortalSession, _hash(token))
            if sess is None or sess.revoked_at is not None:
                raise AuthenticationError("not logged in", code="session_invalid")
            if binding_id not in {b.id for b in self._bindings(s, sess.user_id)}:
                raise InvalidRequestError(f"`binding` {binding_id} is not one of your roles", param="binding")
            sess.binding_id = binding_id
            record(s, ctx, "portal.switch_role", resource_type="session", resource_id=sess.id_hash[:12],
                   details={"binding": binding_id})

    def logout(self, token: str | None, ctx: AuditContext) -> None:
        if not token:
            return
        with self.db.transaction() as s:
            sess = s.get(PortalSession, _hash(token))
            if sess is not None and sess.revoked_at is None:
                sess.revoked_at = utcnow()
                record(s, ctx, "portal.logout", resource_type="session", resource_id=sess.id_hash[:12])
