"""Roles, permissions and the one matrix that decides every route.

Each route declares the permission it needs (``opt={"permission": ...}``);
:data:`ROLE_PERMISSIONS` says which roles hold it. Nothing else grants access.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """What a user may do, within one project or (admin, auditor) globally."""

    ADMIN = "admin"
    DATA_OWNER = "data-owner"
    TRAINER = "trainer"
    CONSUMER = "consumer"
    AUDITOR = "auditor"


#: Roles that only exist globally (no project).
GLOBAL_ONLY_ROLES = frozenset({Role.ADMIN})
#: Roles that may be held globally (all projects) as well as per project.
GLOBAL_CAPABLE_ROLES = frozenset({Role.ADMIN, Role.AUDITOR})


class Permission(enum.StrEnum):
    """An action a route performs; routes name exactly one."""

    # Identity administration
    PROJECTS_MANAGE = "projects:manage"
    PROJECTS_READ = "projects:read"
    USERS_MANAGE = "users:manage"
    TOKENS_MANAGE = "tokens:manage"
    SELF_READ = "self:read"
    # Data intake
    FILES_WRITE = "files:write"
    FILES_READ = "files:read"
    FILES_CONTENT = "files:content"
    # Training
    JOBS_WRITE = "jobs:write"
    JOBS_READ = "jobs:read"
    # Serving
    MODELS_READ = "models:read"
    MODELS_MANAGE = "models:manage"
    MODELS_IMPORT = "models:import"
    INFERENCE = "inference"
    SERVING_ADMIN = "serving:admin"
    # Audit
    AUDIT_READ = "audit:read"
    # API description
    SCHEMA_READ = "schema:read"


_EVERYONE = frozenset(Role)

ROLE_PERMISSIONS: dict[Permission, frozenset[Role]] = {
    Permission.PROJECTS_MANAGE: frozenset({Role.ADMIN}),
    Permission.PROJECTS_READ: _EVERYONE,
    Permission.USERS_MANAGE: frozenset({Role.ADMIN}),
    Permission.TOKENS_MANAGE: frozenset({Role.ADMIN}),
    Permission.SELF_READ: _EVERYONE,
    Permission.FILES_WRITE: frozenset({Role.ADMIN, Role.DATA_OWNER}),
    Permission.FILES_READ: frozenset({Role.ADMIN, Role.DATA_OWNER, Role.TRAINER, Role.AUDITOR}),
    Permission.FILES_CONTENT: frozenset({Role.ADMIN, Role.DATA_OWNER}),
    Permission.JOBS_WRITE: frozenset({Role.ADMIN, Role.TRAINER}),
    Permission.JOBS_READ: frozenset({Role.ADMIN, Role.TRAINER, Role.DATA_OWNER, Role.AUDITOR}),
    Permission.MODELS_READ: frozenset({Role.ADMIN, Role.TRAINER, Role.CONSUMER, Role.AUDITOR}),
    Permission.MODELS_MANAGE: frozenset({Role.ADMIN, Role.TRAINER}),
    Permission.MODELS_IMPORT: frozenset({Role.ADMIN}),
    Permission.INFERENCE: frozenset({Role.ADMIN, Role.TRAINER, Role.CONSUMER}),
    Permission.SERVING_ADMIN: frozenset({Role.ADMIN}),
    Permission.AUDIT_READ: frozenset({Role.ADMIN, Role.AUDITOR}),
    Permission.SCHEMA_READ: _EVERYONE,
}


def role_allows(role: Role, permission: Permission) -> bool:
    """Whether ``role`` holds ``permission`` according to the matrix."""
    return role in ROLE_PERMISSIONS[permission]


def parse_role(value: str, *, param: str = "role") -> Role:
    """``value`` as a :class:`Role`, or an error naming the choices."""
    from appliance.errors import InvalidRequestError

    try:
        return Role(value)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise InvalidRequestError(
            f"`{param}` must be one of {choices}; got {value!r}", param=param
        ) from None
