"""SIGKILL while audited actions are being appended, at random points, several times over.

Twice over: a process appending through the library from several threads (killed five times), and
``appliance serve`` under concurrent audited HTTP requests (killed twice). Each action's state change
and its audit event are one transaction: after every kill both are there or neither, and the chain verifies.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.audit.service import verify_chain
from appliance.bootstrap import open_initialized
from appliance.files.models import StoredFile
from appliance.identity.models import ApiToken, Project
from tests.cli_helpers import Server, cli_env
from tests.conftest import REPO, bearer, free_port, make_settings
from tests.faults.conftest import assert_audit_verifies, record

pytestmark = pytest.mark.slow  # real processes started and killed

KILLS = 5
THREADS = 4


def run_until_killed(home, run: str, delay: float) -> dict[str, set[str]]:
    """Start the writer, SIGKILL it ``delay`` seconds after it is running; what it saw committed."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.audit_writer", run, str(THREADS)],
                            env=cli_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, set[str]] = {"ready": set(), "project": set(), "token": set()}
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            kind, ident = line.split()
            seen[kind].add(ident)
            if kind == "ready":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), f"writer did not start:\n{proc.stderr.read() if proc.poll() is not None else ''}"
        time.sleep(delay)
        assert proc.poll() is None, f"writer died on its own:\n{proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return seen


def assert_actions_match_events(settings, committed: dict[str, set[str]], context) -> None:
    """The chain verifies; projects, tokens and files each have their ``*.create``/``upload`` event and back."""
    db = open_initialized(settings)
    try:
        result = verify_chain(db)
        assert result.ok, (context, result)
        with db.read() as s:
            state = {"project": set(s.scalars(select(Project.name))),
                     "token": set(s.scalars(select(ApiToken.token_id))),
                     "file": set(s.scalars(select(StoredFile.id)))}
            events = {kind: set(s.scalars(select(AuditEvent.resource_id).where(AuditEvent.action == action)))
                      for kind, action in (("project", "project.create"), ("token", "token.create"),
                                           ("file", "file.upload"))}
    finally:
        db.dispose()
    for kind in state:
        # Both or neither: every object has its event, every event its object...
        assert state[kind] == events[kind], (context, kind, state[kind] ^ events[kind])
        # ...and whatever a client saw committed survived the kill.
        assert committed.get(kind, set()) <= state[kind], (context, kind, committed[kind] - state[kind])


def test_sigkill_during_audit_appends_keeps_actions_and_events_together(fault_home):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    settings = make_settings(fault_home.path)
    committed: dict[str, set[str]] = {"project": set(), "token": set()}
    for run in range(KILLS):
        seen = run_until_killed(fault_home.path, f"r{run}", delay=rng.uniform(0.3, 2.0))
        for kind in committed:
            committed[kind] |= seen[kind]
        assert_actions_match_events(settings, committed, (seed, run))
    print(f"seed {seed}: {len(committed['project'])} projects, {len(committed['token'])} tokens committed over {KILLS} kills")
    assert len(committed["project"]) + len(committed["token"]) >= KILLS * THREADS, (seed, committed)
    assert_audit_verifies(fault_home.path)


SERVER_KILLS = 2
HTTP_CLIENTS = 6


def hammer(base_url: str, admin: str, owner: str, run: int, t: int, committed: dict[str, set[str]], lock) -> None:
    """Audited requests in a loop until the server goes away; notes what was acknowledged."""
    def acknowledged(kind: str, ident: str) -> None:
        with lock:
            committed.setdefault(kind, set()).add(ident)

    with httpx.Client(base_url=base_url, timeout=30) as http:
        i = 0
        try:
            while True:
                name = f"h-{run}-{t}-{i}"
                resp = http.post("/api/v1/projects", headers=bearer(admin), json={"name": name})
                if resp.status_code in (200, 201):
                    acknowledged("project", name)
                resp = http.post("/api/v1/tokens", headers=bearer(admin),
                                 json={"user": "olivia", "role": "data-owner", "project": "acme"})
                if resp.status_code in (200, 201):
                    acknowledged("token", resp.json()["id"])
                resp = http.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                                 files={"file": (f"{name}.jsonl", record(i, name))})
                if resp.status_code == 201:
                    acknowledged("file", resp.json()["id"])
                http.get("/v1/files", headers=bearer("apl_not_a_token"))  # a denial: audited on its own
                i += 1
        except httpx.HTTPError:
            return


def test_sigkill_of_the_server_under_concurrent_audited_requests(fault_home):
    rng = random.Random(seed := random.randrange(2**32))
    port = free_port()
    committed: dict[str, set[str]] = {}
    lock = threading.Lock()
    for run in range(SERVER_KILLS):
        server = Server(fault_home.path, port)
        try:
            server.wait_healthy()
            clients = [threading.Thread(target=hammer, daemon=True, args=(
                server.base_url, fault_home.admin, fault_home.owner, run, t, committed, lock))
                for t in range(HTTP_CLIENTS)]
            for c in clients:
                c.start()
            time.sleep(rng.uniform(3.0, 6.0))
            assert server.proc.poll() is None, server.output()
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
            for c in clients:
                c.join(30)
        finally:
            server.stop()
        assert_actions_match_events(make_settings(fault_home.path), committed, (seed, run))
    print(f"seed {seed}: acknowledged " + ", ".join(f"{len(v)} {k}s" for k, v in committed.items())
          + f" over {SERVER_KILLS} kills")
    assert all(committed.get(kind) for kind in ("project", "token", "file")), (seed, committed)
    assert_audit_verifies(fault_home.path)
