"""Several schedulers (control-plane replicas) on one database: claims, leases and takeover.

The claim and lease checks run on both back ends. The tests that train on two
schedulers at once need PostgreSQL, the database replicas share; ``make test``
always runs them in its PostgreSQL pass.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from litestar.testing import TestClient
from sqlalchemy import select, update

from appliance.audit.models import AuditEvent
from appliance.audit.service import verify_chain
from appliance.catalog.models import AdapterRecord
from appliance.db.base import Database, utcnow
from appliance.identity.models import Project
from appliance.jobs.executors import local as local_executor
from appliance.jobs.models import FineTuningJob, JobEvent
from appliance.jobs.scheduler import Scheduler, SchedulerSettings
from appliance.server.app import create_app
from appliance.server.state import AppState, build_state
from tests.conftest import CLI_CTX, TEST_DATABASE_URL
from tests.integration.test_jobs import TERMINAL, api_for, hp, owner, qa, tiny_model, trainer, upload  # noqa: F401
from tests.timing import Deadline

needs_postgres = pytest.mark.skipif(
    not TEST_DATABASE_URL,
    reason="replicas share a PostgreSQL database; set TEST_DATABASE_URL (make test's PostgreSQL pass does)")


def _queued_jobs(state: AppState, n: int, model: str = "tiny-llama") -> list[str]:
    state.identity.create_project(CLI_CTX, "acme")
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        ids = [f"ftjob-q{i:02d}" for i in range(n)]
        for job_id in ids:
            s.add(FineTuningJob(id=job_id, project_id=project.id, created_by="trish", model=model,
                                training_file="file-x", seed=1, method_type="lora", status="queued"))
    return ids


def _audit_counts(db: Database, action: str) -> Counter[str]:
    with db.read() as s:
        return Counter(s.scalars(select(AuditEvent.resource_id).where(AuditEvent.action == action)))


def _replica(state: AppState, **settings) -> tuple[Database, Scheduler]:
    """A second control plane's scheduler: its own engine on the same database, the same storage."""
    db = Database(state.settings.database_url)
    return db, Scheduler(db, state.files, state.catalog, SchedulerSettings(**settings))


def test_concurrent_claims_take_each_job_once(state):
    ids = _queued_jobs(state, 12)
    db_b, b = _replica(state)
    a = Scheduler(state.db, state.files, state.catalog)
    claims: list[tuple[str, int, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def claim_all(scheduler: Scheduler) -> None:
        try:
            barrier.wait()
            while (claimed := scheduler._claim()) is not None:  # noqa: SLF001 - the claim itself is under test
                claims.append((*claimed, scheduler.name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(s,)) for s in (a, a, b, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(job_id for job_id, _, _ in claims) == ids  # every job, none twice
    with state.db.read() as s:
        rows = {j.id: j for j in s.scalars(select(FineTuningJob))}
    for job_id, attempt, name in claims:
        row = rows[job_id]
        assert (row.status, row.attempts, attempt, row.worker) == ("running", 1, 1, name)
        assert row.lease_expires_at > utcnow()
    assert _audit_counts(state.db, "job.start") == Counter(ids)
    assert verify_chain(state.db).ok
    db_b.dispose()


def test_recovery_takes_over_expired_leases_and_exited_owners_only(state):
    ids = _queued_jobs(state, 5)
    a = Scheduler(state.db, state.files, state.catalog)
    host, node, _, _ = a.name.split(":")
    exited = subprocess.Popen(["true"])
    exited.wait()
    now = utcnow()
    leases = {
        # another host's scheduler that stopped renewing
        ids[0]: ("elsewhere:0123456789ab:4242:aaaaaa", now - timedelta(seconds=1)),
        # another host's live scheduler
        ids[1]: ("elsewhere:0123456789ab:4243:bbbbbb", now + timedelta(seconds=60)),
        # a server on this host that was killed: no need to wait for its lease
        ids[2]: (f"{host}:{node}:{exited.pid}:cccccc", now + timedelta(seconds=60)),
        # a live server on this host
        ids[3]: (f"{host}:{node}:{os.getppid()}:dddddd", now + timedelta(seconds=60)),
        # a row from before leases: nobody can own it
        ids[4]: (None, None),
    }
    with state.db.transaction() as s:
        for job_id, (worker, expires) in leases.items():
            s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                      .values(status="running", worker=worker, lease_expires_at=expires, attempts=1))
    assert a.recover() == 3
    with state.db.read() as s:
        status = {j.id: (j.status, j.resumable, (j.error or {}).get("code")) for j in s.scalars(select(FineTuningJob))}
    lost = ("failed", True, "worker_lost")
    assert status == {ids[0]: lost, ids[1]: ("running", False, None), ids[2]: lost,
                      ids[3]: ("running", False, None), ids[4]: lost}
    assert _audit_counts(state.db, "job.fail") == Counter([ids[0], ids[2], ids[4]])
    assert a.recover() == 0


def _no_scheduler_client(state: AppState) -> TestClient:
    return TestClient(create_app(state.settings, state, run_scheduler=False))


def _wait_rows(db: Database, ids: list[str], statuses=TERMINAL, timeout: float = 400) -> dict[str, FineTuningJob]:
    deadline = Deadline(timeout)
    while True:
        with db.read() as s:
            rows = {j.id: j for j in s.scalars(select(FineTuningJob).where(FineTuningJob.id.in_(ids)))}
        if all(r.status in statuses for r in rows.values()):
            return rows
        assert deadline, {i: r.status for i, r in rows.items()}
        time.sleep(0.3)


@needs_postgres
def test_two_schedulers_run_every_job_exactly_once(state, tiny_model, trainer, owner, monkeypatch):
    launches: list[str] = []
    spawn = local_executor.spawn

    def counting_spawn(*args, **kw):
        launches.append(threading.current_thread().name)
        return spawn(*args, **kw)

    monkeypatch.setattr(local_executor, "spawn", counting_spawn)
    with _no_scheduler_client(state) as client:
        train_id = upload(client, owner, [qa(i) for i in range(8)])
        api = api_for(client, trainer)
        ids = [api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method={
            "type": "lora", "lora": {"hyperparameters": hp(n_epochs=1)}}).id for _ in range(4)]
        replicas = [build_state(state.settings, Database(state.settings.database_url)) for _ in range(2)]
        for replica in replicas:
            replica.scheduler.start()
        try:
            rows = _wait_rows(state.db, ids)
        finally:
            for replica in replicas:
                replica.scheduler.stop()
                replica.db.dispose()
    assert {r.status for r in rows.values()} == {"succeeded"}, {i: r.error for i, r in rows.items()}
    assert all(r.attempts == 1 for r in rows.values())
    assert {r.worker for r in rows.values()} == {replica.scheduler.name for replica in replicas}  # both worked
    assert len(launches) == len(ids)
    assert _audit_counts(state.db, "job.queue") == Counter(ids)
    assert _audit_counts(state.db, "job.start") == Counter(ids)
    assert _audit_counts(state.db, "job.succeed") == Counter(ids)
    with state.db.read() as s:
        started = Counter(s.scalars(select(JobEvent.job_id).where(JobEvent.message.like("Fine-tuning job started%"))))
        adapters = Counter(s.scalars(select(AdapterRecord.job_id)))
    assert started == Counter(ids) and adapters == Counter(ids)
    assert verify_chain(state.db).ok


@needs_postgres
def test_a_stalled_scheduler_loses_its_job_and_its_late_result_is_dropped(state, tiny_model, trainer, owner):
    with _no_scheduler_client(state) as client:
        train_id = upload(client, owner, [qa(i) for i in range(16)])
        api = api_for(client, trainer)
        job_id = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method={
            "type": "lora", "lora": {"hyperparameters": hp(n_epochs=2)}}).id
        db_a, stalled = _replica(state, lease_s=1.0)
        # A replica that claimed the job, then stopped reaching the database while its worker trains on.
        stalled._renew_leases = lambda: None
        stalled.recover = lambda: 0
        stalled.start()
        db_b, healthy = _replica(state, lease_s=2.0)
        try:
            deadline = Deadline(60)
            while job_id not in stalled.running():
                assert deadline, "the stalled replica never claimed the job"
                time.sleep(0.05)
            healthy.start()
            lost = _wait_rows(state.db, [job_id], {"failed"}, timeout=60)[job_id]
            assert lost.resumable and lost.error["code"] == "worker_lost" and lost.worker == stalled.name
            deadline = Deadline(300)
            while stalled.running():  # its worker trains on to the end...
                assert deadline
                time.sleep(0.3)
            assert _wait_rows(state.db, [job_id])[job_id].status == "failed"  # ...and its result is dropped
            with state.db.read() as s:
                assert s.scalar(select(AdapterRecord).where(AdapterRecord.job_id == job_id)) is None
            stalled.stop()
            assert api.post(f"/fine_tuning/jobs/{job_id}/resume", cast_to=object)["status"] == "queued"
            done = _wait_rows(state.db, [job_id])[job_id]
        finally:
            for scheduler, db in ((stalled, db_a), (healthy, db_b)):
                scheduler.stop()
                db.dispose()
    assert done.status == "succeeded" and done.attempts == 2 and done.worker == healthy.name, done.error
    assert _audit_counts(state.db, "job.start")[job_id] == 2
    assert _audit_counts(state.db, "job.fail")[job_id] == 1
    assert _audit_counts(state.db, "job.succeed")[job_id] == 1
    assert verify_chain(state.db).ok


@needs_postgres
def test_an_owner_that_lost_its_lease_kills_its_worker(state, tiny_model, trainer, owner):
    with _no_scheduler_client(state) as client:
        train_id = upload(client, owner, [qa(i) for i in range(40)])
        api = api_for(client, trainer)
        job_id = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method={
            "type": "lora", "lora": {"hyperparameters": hp(n_epochs=100, batch_size=1)}}).id
        db_a, a = _replica(state, lease_s=2.0)
        a.start()
        try:
            _wait_rows(state.db, [job_id], {"running"}, timeout=60)
            deadline = Deadline(60)
            while job_id not in a.running():
                assert deadline
                time.sleep(0.05)
            pid = a._runs[job_id].worker.proc.pid  # noqa: SLF001 - the test checks the real worker ends
            # What another replica's takeover writes (it judged the lease expired).
            with state.db.transaction() as s:
                s.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(
                    status="failed", resumable=True, lease_expires_at=None,
                    error={"code": "worker_lost", "message": "taken over", "param": None}))
            deadline = Deadline(20)
            while a.running():
                assert deadline, "the worker of a lost job kept running"
                time.sleep(0.1)
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        finally:
            a.stop()
            db_a.dispose()
    row = _wait_rows(state.db, [job_id])[job_id]
    assert row.status == "failed" and row.error["message"] == "taken over"  # not overwritten by the old owner
    assert _audit_counts(state.db, "job.fail")[job_id] == 0 and _audit_counts(state.db, "job.succeed")[job_id] == 0
