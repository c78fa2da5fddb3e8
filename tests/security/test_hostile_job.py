"""The attack catalogue as a job: a hostile worker started by the real scheduler, from a real job.

The scheduler runs ``tests.security.hostile_worker`` as the job's worker (a module only a test can
choose: ``SchedulerSettings(worker_module=...)``; no API field selects a worker). Given nothing but
its start frame, the worker works out where the appliance's home is, as an intruder would, and tries
to read the key file and the database, list the storage root, write into the home, reach out, ptrace,
mount and call ``keyctl``/``bpf``. At the default level every attempt fails, the job's outcome says
so, and the server keeps serving.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.bootstrap import open_initialized
from appliance.identity.roles import Role
from appliance.jobs.isolation import IsolationLevel
from appliance.jobs.scheduler import SchedulerSettings
from appliance.server.state import AppState, build_state
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[IsolationLevel.SANDBOX, IsolationLevel.NONE], ids=lambda level: level.value)
def level(request) -> IsolationLevel:
    return request.param


@pytest.fixture
def state(home, monkeypatch, level) -> Iterator[AppState]:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the worker imports tests.security.hostile_worker
    db = open_initialized(home)
    yield build_state(home, db, SchedulerSettings(lease_s=home.jobs.lease_s, isolation=level,
                                                  worker_module="tests.security.hostile_worker"))
    db.dispose()


def test_a_hostile_job_reaches_nothing_and_the_server_keeps_serving(client, state, make_token, tmp_path, level):
    """At ``none`` the same job reads the key file: the control that shows the catalogue aims right."""
    from appliance.modelstore import build_tiny_causal_lm

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(tmp_path / "tiny-src", seed=0), "tiny-llama")
    owner, trainer = make_token("olivia", Role.DATA_OWNER, "acme"), make_token("trish", Role.TRAINER, "acme")
    records = [{"messages": [{"role": "user", "content": f"What is item {i}?"},
                             {"role": "assistant", "content": f"Item {i} is a blue box"}]} for i in range(8)]
    resp = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                       files={"file": ("train.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in records))})
    assert resp.status_code == 201, resp.text
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    key_before = state.settings.key_file.read_bytes()
    job = api.fine_tuning.jobs.create(model="tiny-llama", training_file=resp.json()["id"],
                                      method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1}}})
    deadline = Deadline(120)
    while deadline and (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed"):
        time.sleep(0.3)
    assert job.status == "failed" and job.error.code == "hostile_catalogue", job.error
    report = next(e for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "hostile").data
    written = state.settings.home.home / "written-by-a-job"
    if level is IsolationLevel.SANDBOX:
        assert job.error.message == "attempts that got through: none", job.error.message
        assert report["read_key_file"]["detail"] == "ENOENT" and report["list_storage"]["detail"] == "ENOENT"
        assert report["tcp_outside"]["detail"] == "socket: EAFNOSUPPORT"
        assert not written.exists()
    else:
        # On PostgreSQL the database is a server, not a file in the home: only SQLite's can be read.
        sqlite = state.settings.database_url.startswith("sqlite")
        for reached in ("read_key_file", "list_storage", "write_outside_tmp", *(["read_database"] if sqlite else [])):
            assert reached in job.error.message and report[reached]["through"], report
        assert written.read_bytes() == b"hostile"
        with state.db.read() as s:  # the weaker level is on the record from the scheduler's start
            weakened = s.scalars(select(AuditEvent).where(AuditEvent.action == "worker.isolation.weakened")).all()
        assert weakened and weakened[0].details["level"] == "none"
    # The key is intact and the server still answers.
    assert state.settings.key_file.read_bytes() == key_before
    assert client.get("/health").status_code == 200
    assert api.models.list().data
