"""A populated appliance for the security tests: two projects, a caller per role, resources in each.

``acme`` is the callers' own project, ``globex`` the other one. Each holds a
file, a fine-tuning job and a published adapter whose names carry the project's
marker, so a response that leaks the other project's data is easy to spot.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from litestar.testing import TestClient
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.bootstrap import initialize, open_initialized
from appliance.catalog.models import BaseModelRecord
from appliance.identity.models import Project
from appliance.identity.roles import Role
from appliance.jobs.models import FineTuningJob
from appliance.jobs.service import new_job_id
from appliance.identity.sessions import COOKIE
from appliance.server.app import create_app
from appliance.server.state import AppState, build_state
from tests.conftest import CLI_CTX, bearer, make_settings

OWN, OTHER = "acme", "globex"
PASSWORD = "correct horse battery staple"
BASE_MODEL = "tiny-llama"


def jsonl(*records: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@dataclass
class Session:
    user: str
    cookie: str
    csrf: str
    binding: int

    def headers(self, *, csrf: bool = True) -> dict[str, str]:
        h = {"Cookie": f"{COOKIE}={self.cookie}"}
        if csrf:
            h["X-CSRF-Token"] = self.csrf
        return h


@dataclass
class World:
    """The app, its state, and what each project holds."""

    state: AppState
    client: TestClient
    tokens: dict[Role, str]  # acme callers (the admin is global)
    users: dict[Role, str]
    owner_token: dict[str, str]  # project -> its data owner's token
    files: dict[str, str] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    _n: Iterator[int] = field(default_factory=itertools.count)

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self._n)}-{secrets.token_hex(2)}"

    # -- resources -------------------------------------------------------------
    def upload(self, project: str, *, filename: str | None = None, data: bytes | None = None) -> str:
        resp = self.client.post(
            "/v1/files", headers=bearer(self.owner_token[project]), data={"purpose": "fine-tune"},
            files={"file": (filename or f"{project}-secret.jsonl",
                            data or jsonl(chat(f"what is the {project} code word?", f"marker-{project}")))})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def job(self, project: str, status: str = "queued") -> str:
        """A job row as the API would create it (the scheduler is off: it never runs)."""
        job_id = new_job_id()
        with self.state.db.transaction() as s:
            project_id = s.scalar(select(Project.id).where(Project.name == project))
            s.add(FineTuningJob(id=job_id, project_id=project_id, created_by="test", model=BASE_MODEL,
                                training_file=self.files.get(project, "file-none"), seed=1, method_type="lora",
                                hyperparameters={}, status=status, resumable=status == "failed"))
        return job_id

    def adapter(self, project: str) -> str:
        """A published adapter (its files are placeholders: it is never served)."""
        tag = self.unique("m")
        job_id = f"ftjob-{tag}"
        adapter_id = f"ft:{BASE_MODEL}:{project}:{tag}:{job_id}"
        with self.state.db.transaction() as s:
            row = s.scalar(select(Project).where(Project.name == project))
            self.state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=job_id, project=row,
                                       base_model=BASE_MODEL, kind="lora",
                                       files={"adapter_config.json": b"{}"}, manifest={"job_id": job_id})
        return adapter_id

    def token(self, role: Role = Role.CONSUMER, project: str | None = OWN) -> tuple[str, str]:
        """A fresh (token id, token value) of a fresh user."""
        user = self.unique("tok")
        self.state.identity.create_user(CLI_CTX, user)
        self.state.identity.grant(CLI_CTX, user, role, project)
        view, value = self.state.identity.create_token(CLI_CTX, user, role, project)
        return view.token_id, value

    # -- portal ------------------------------------------------------------------
    def session(self, role: Role) -> Session:
        """A fresh portal session of the ``role``'s web user."""
        user = f"web-{role.value}"
        cookie = self.state.sessions.login(user, PASSWORD, "testclient")
        info = self.state.sessions.resolve(cookie)
        return Session(user, cookie, info.csrf_token, info.binding_id)

    # -- audit -------------------------------------------------------------------
    def events(self, request_id: str | None, action: str | None = None) -> list[AuditEvent]:
        with self.state.db.read() as s:
            stmt = select(AuditEvent).where(AuditEvent.request_id == request_id)
            if action:
                stmt = stmt.where(AuditEvent.action == action)
            return list(s.scalars(stmt.order_by(AuditEvent.seq)))


def build_world(tmp_path_factory, name: str, **env: str) -> Iterator[World]:
    settings = make_settings(tmp_path_factory.mktemp(name) / "home", APPLIANCE_AUTH_MAX_FAILURES="100000", **env)
    initialize(settings, CLI_CTX)
    state = build_state(settings, open_initialized(settings))
    identity = state.identity
    for project in (OWN, OTHER):
        identity.create_project(CLI_CTX, project)
    tokens = {Role.ADMIN: settings.home.admin_token_file.read_text().strip()}
    users = {Role.ADMIN: "admin"}
    for role in Role:
        web = f"web-{role.value}"
        identity.create_user(CLI_CTX, web)
        identity.grant(CLI_CTX, web, role, None if role is Role.ADMIN else OWN)
        state.sessions.set_password(CLI_CTX, web, PASSWORD)
        if role is Role.ADMIN:
            continue
        user = f"{role.value}-{OWN}"
        identity.create_user(CLI_CTX, user)
        identity.grant(CLI_CTX, user, role, OWN)
        tokens[role] = identity.create_token(CLI_CTX, user, role, OWN)[1]
        users[role] = user
    identity.create_user(CLI_CTX, "owner-globex")
    identity.grant(CLI_CTX, "owner-globex", Role.DATA_OWNER, OTHER)
    owner_token = {OWN: tokens[Role.DATA_OWNER],
                   OTHER: identity.create_token(CLI_CTX, "owner-globex", Role.DATA_OWNER, OTHER)[1]}
    with state.db.transaction() as s:
        # A base model as the catalogue lists it; never loaded (the scheduler is off, chat names no model).
        s.add(BaseModelRecord(name=BASE_MODEL, kind="llm", path="/nonexistent", content_hash="sha256:0",
                              architecture="LlamaForCausalLM", parameters=1, imported_by="test"))
    with TestClient(create_app(settings, state, run_scheduler=False)) as client:
        world = World(state=state, client=client, tokens=tokens, users=users, owner_token=owner_token)
        for project in (OWN, OTHER):
            world.files[project] = world.upload(project)
            world.jobs[project] = world.job(project)
            world.adapters[project] = world.adapter(project)
        yield world
    state.db.dispose()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    yield from build_world(tmp_path_factory, "world")


def error_of(resp, status: int, code: str | None = None) -> dict[str, Any]:
    """The ``error`` object of an API error response, checking its shape."""
    assert resp.status_code == status, f"{resp.status_code} {resp.text[:500]}"
    body = resp.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "param", "type"} <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]
