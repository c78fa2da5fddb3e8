"""Shared fixtures: an initialised home in a temp dir, the app, tokens per role."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from appliance.audit.service import AuditContext
from appliance.bootstrap import initialize, open_initialized
from appliance.identity.roles import Role
from appliance.server.app import create_app
from appliance.server.state import AppState, build_state
from appliance.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
CLI_CTX = AuditContext.cli("pytest")

# Nothing in the suite may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: Set (e.g. ``postgresql+psycopg://postgres@127.0.0.1:54329/postgres``) to run the suite on PostgreSQL:
#: every appliance home then gets its own fresh database on that server.
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
_created_databases: set[str] = set()


def database_url_for(home: Path) -> str | None:
    """The database a test home uses: its own PostgreSQL database in PostgreSQL mode, else None (SQLite)."""
    if not TEST_DATABASE_URL:
        return None
    import hashlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "t_" + hashlib.sha1(str(Path(home).resolve()).encode()).hexdigest()[:20]
    if name not in _created_databases:
        admin = create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        _created_databases.add(name)
    return make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001 - pytest hook
    if TEST_DATABASE_URL and _created_databases:
        from sqlalchemy import create_engine, text

        admin = create_engine(TEST_DATABASE_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for name in _created_databases:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_settings(home: Path, **env: str) -> Settings:
    url = database_url_for(home)
    if url and "APPLIANCE_DATABASE_URL" not in env:
        env["APPLIANCE_DATABASE_URL"] = url
    return load_settings({"APPLIANCE_HOME": str(home), **env})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home")


@pytest.fixture
def home(settings: Settings) -> Settings:
    """An initialised ``$APPLIANCE_HOME``."""
    initialize(settings, CLI_CTX)
    return settings


@pytest.fixture
def state(home: Settings) -> Iterator[AppState]:
    db = open_initialized(home)
    yield build_state(home, db)
    db.dispose()


@pytest.fixture
def client(state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(state.settings, state)) as c:
        yield c


@pytest.fixture
def admin_token(home: Settings) -> str:
    return home.home.admin_token_file.read_text().strip()


TokenFactory = Callable[..., str]


@pytest.fixture
def make_token(state: AppState) -> TokenFactory:
    """``make_token(user, role, project=None)``: create what is missing, return a token value."""

    def factory(user: str, role: Role | str, project: str | None = None, **kw) -> str:
        identity = state.identity
        role = Role(role)
        if project and project not in [p.name for p in identity.list_projects(None)]:
            identity.create_project(CLI_CTX, project)
        if user not in dict(identity.list_users()):
            identity.create_user(CLI_CTX, user)
        identity.grant(CLI_CTX, user, role, project)
        return identity.create_token(CLI_CTX, user, role, project, **kw)[1]

    return factory


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
