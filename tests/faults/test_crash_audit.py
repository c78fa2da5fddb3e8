"""SIGKILL while audited actions are being appended, at random points, several times over."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.audit.service import verify_chain
from appliance.bootstrap import open_initialized
from appliance.identity.models import ApiToken, Project
from tests.cli_helpers import cli_env
from tests.conftest import REPO, make_settings
from tests.faults.conftest import assert_audit_verifies

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


def test_sigkill_during_audit_appends_keeps_actions_and_events_together(fault_home):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    settings = make_settings(fault_home.path)
    committed: dict[str, set[str]] = {"project": set(), "token": set()}
    for run in range(KILLS):
        seen = run_until_killed(fault_home.path, f"r{run}", delay=rng.uniform(0.3, 2.0))
        for kind in committed:
            committed[kind] |= seen[kind]
        db = open_initialized(settings)
        try:
            result = verify_chain(db)
            assert result.ok, (seed, run, result)
            with db.read() as s:
                projects = set(s.scalars(select(Project.name)))
                tokens = set(s.scalars(select(ApiToken.token_id)))
                events = {action: set(s.scalars(select(AuditEvent.resource_id).where(AuditEvent.action == action)))
                          for action in ("project.create", "token.create")}
        finally:
            db.dispose()
        # Both or neither: every project and token has its event, every event its project or token...
        assert projects == events["project.create"], (seed, run, projects ^ events["project.create"])
        assert tokens == events["token.create"], (seed, run, tokens ^ events["token.create"])
        # ...and whatever the writer saw committed survived the kill.
        assert committed["project"] <= projects and committed["token"] <= tokens, (seed, run)
    print(f"seed {seed}: {len(committed['project'])} projects, {len(committed['token'])} tokens committed over {KILLS} kills")
    assert len(committed["project"]) + len(committed["token"]) >= KILLS * THREADS, (seed, committed)
    assert_audit_verifies(fault_home.path)
