"""Request and response bodies of the identity API."""

from __future__ import annotations

from datetime import datetime

import msgspec


class ProjectCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class ProjectOut(msgspec.Struct):
    name: str
    created_at: datetime
    object: str = "project"


class MemberOut(msgspec.Struct):
    user: str
    role: str


class UserCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class Grant(msgspec.Struct):
    role: str
    project: str | None = None


class GrantCreate(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    project: str | None = None


class UserOut(msgspec.Struct):
    name: str
    roles: list[Grant]
    object: str = "user"


class TokenCreate(msgspec.Struct, forbid_unknown_fields=True):
    user: str
    role: str
    project: str | None = None
    expires_at: datetime | None = None
    description: str = ""


class TokenOut(msgspec.Struct):
    id: str
    user: str
    role: str
    project: str | None
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    object: str = "token"


class TokenCreated(TokenOut, kw_only=True):
    #: The token value, shown once.
    token: str


class Me(msgspec.Struct):
    user: str
    role: str
    project: str | None
    token_id: str | None


class ListOf(msgspec.Struct):
    data: list
    object: str = "list"
