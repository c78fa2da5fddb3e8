"""The search driver with scripted trials: the trial jobs' rows are moved as the scheduler would move them,
so the wall-time limit, a search cancelled by a person and a search whose trials all failed are checked in
a second each (the end-to-end run through real workers is tests/integration/test_search_jobs.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.db.base import utcnow
from appliance.identity.models import Project
from appliance.identity.roles import Role
from appliance.jobs.models import FineTuningJob
from appliance.jobs.search import parse_search, stored
from appliance.jobs.search_runner import SearchRunner
from appliance.training.hyperparameters import HYPERPARAMETERS


class Clock:
    def __init__(self) -> None:
        self.now = utcnow().timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def search_job(state, make_token) -> str:
    make_token("trish", Role.TRAINER, "acme")
    spec = parse_search("lora", {"learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}, "n_epochs": 2},
                        {"trials": 3, "max_seconds": 600, "sampler": "random"},
                        lambda values: HYPERPARAMETERS["lora"](**values))
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        s.add(FineTuningJob(id="ftjob-search", project_id=project.id, created_by="trish", model="base",
                            training_file="file-x", seed=1, method_type="lora", hyperparameters={},
                            status="queued", search=stored(spec)))
    return "ftjob-search"


def trials(state, job_id: str) -> list[FineTuningJob]:
    with state.db.read() as s:
        return list(s.scalars(select(FineTuningJob).where(FineTuningJob.search_id == job_id)
                              .order_by(FineTuningJob.trial_number)))


def move(state, job_id: str, **values) -> None:
    with state.db.transaction() as s:
        job = s.get(FineTuningJob, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def audit(state, resource_id: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id == resource_id)
                              .order_by(AuditEvent.seq)))


def test_at_the_time_limit_running_trials_are_cancelled_and_the_best_finished_one_wins(state, search_job):
    clock = Clock()
    runner = SearchRunner(state.db, concurrency=2, clock=clock)
    runner.tick()
    first, second = trials(state, search_job)
    assert (first.trial_number, second.trial_number) == (0, 1) and first.status == "validating_files"
    assert first.hyperparameters["n_epochs"] == 2 and first.hyperparameters["seed"] == 1
    move(state, first.id, status="succeeded", metrics={"valid_loss_after": 1.5}, fine_tuned_model="ft:base:acme::a")
    move(state, second.id, status="running")
    runner.tick()  # trial 0 ended: trial 2 starts beside trial 1
    assert len(trials(state, search_job)) == 3
    clock.now += 601
    runner.tick()
    running = [t for t in trials(state, search_job) if t.status != "succeeded"]
    assert all(t.cancel_requested or t.status == "cancelled" for t in running)
    cancels = [e for t in running for e in audit(state, t.id) if e.action == "job.cancel"]
    assert len(cancels) == 2 and {e.reason for e in cancels} == {"max_seconds"}
    assert {e.actor for e in cancels} == {"system:search"}
    with state.db.read() as s:
        assert s.get(FineTuningJob, search_job).status == "running"  # until its trials have stopped
    move(state, second.id, status="cancelled")
    runner.tick()
    with state.db.read() as s:
        job = s.get(FineTuningJob, search_job)
    assert job.status == "succeeded" and job.fine_tuned_model == "ft:base:acme::a"
    assert [(r["number"], r["state"], r["reason"]) for r in job.search["trial_table"]] == [
        (0, "complete", None), (1, "failed", "max_seconds"), (2, "failed", "max_seconds")]
    assert job.search["best_trial"] == 0
    [succeed] = [e for e in audit(state, search_job) if e.action == "job.succeed"]
    assert succeed.details["best_trial"] == 0 and len(succeed.details["trials"]) == 3


def test_a_search_whose_trials_all_failed_fails(state, search_job):
    runner = SearchRunner(state.db, concurrency=1)
    for _ in range(3):
        runner.tick()
        [current] = [t for t in trials(state, search_job) if t.status not in ("failed",)]
        move(state, current.id, status="failed", error={"code": "worker_error", "message": "x", "param": None})
    runner.tick()
    with state.db.read() as s:
        job = s.get(FineTuningJob, search_job)
    assert job.status == "failed" and job.error["code"] == "search_no_trial_completed"
    assert [r["reason"] for r in job.search["trial_table"]] == ["worker_error"] * 3
    assert [e.action for e in audit(state, search_job)] == ["job.start", "job.fail"]


def test_a_cancelled_search_cancels_its_trials_and_ends_cancelled(state, search_job):
    runner = SearchRunner(state.db, concurrency=1)
    runner.tick()
    [trial] = trials(state, search_job)
    move(state, trial.id, status="running")
    move(state, search_job, cancel_requested=True, started_at=utcnow() - timedelta(seconds=5))
    runner.tick()
    [trial] = trials(state, search_job)
    assert trial.cancel_requested and trial.status == "running"  # the scheduler forwards it to the worker
    move(state, trial.id, status="cancelled")
    runner.tick()
    with state.db.read() as s:
        job = s.get(FineTuningJob, search_job)
    assert job.status == "cancelled" and len(job.search["trial_table"]) == 1
    assert [e.action for e in audit(state, search_job)][-1] == "job.cancelled"


def test_a_search_that_cannot_be_driven_fails_and_cancels_its_trials(state, search_job, monkeypatch):
    """Instead of staying running with nothing acting on it (a cancel included)."""
    from appliance.jobs import search_runner

    runner = SearchRunner(state.db, concurrency=1)
    runner.tick()
    [first] = trials(state, search_job)
    move(state, first.id, status="running")

    def broken(self, records):
        raise RuntimeError("the study cannot be rebuilt")

    monkeypatch.setattr(search_runner.SearchStudy, "restore", broken)
    for _ in range(search_runner.MAX_DRIVE_FAILURES - 1):
        runner.tick()
    with state.db.read() as s:
        assert s.get(FineTuningJob, search_job).status == "running"  # tried again each tick until the limit
    runner.tick()
    with state.db.read() as s:
        job, trial = s.get(FineTuningJob, search_job), s.get(FineTuningJob, first.id)
    assert job.status == "failed" and job.error["code"] == "search_driver_failed"
    assert "RuntimeError" in job.error["message"] and "cannot be rebuilt" not in job.error["message"]
    assert trial.cancel_requested
    [cancel] = [e for e in audit(state, first.id) if e.action == "job.cancel"]
    assert cancel.reason == "search_failed" and cancel.actor == "system:search"
    [fail] = [e for e in audit(state, search_job) if e.action == "job.fail"]
    assert fail.reason == "search_driver_failed" and fail.details == {"exception": "RuntimeError"}


def test_a_search_s_first_trial_is_made_at_once_once_its_files_are_validated(state, search_job, monkeypatch):
    """The scheduler drives searches before it promotes jobs (so a new trial is claimed in the tick that made
    it); a search it has just promoted wakes it to tick again at once instead of after poll_s."""
    scheduler = state.scheduler
    move(state, search_job, status="validating_files")
    monkeypatch.setattr(scheduler.files, "is_live", lambda s, file_id: True)
    scheduler.busy = lambda: True  # nothing is claimed: the search's own steps are under test
    scheduler._tick()  # noqa: SLF001 - one tick of the loop
    with state.db.read() as s:
        assert s.get(FineTuningJob, search_job).status == "queued"
    assert trials(state, search_job) == [] and scheduler._wake.is_set()  # noqa: SLF001
    scheduler._wake.clear()  # noqa: SLF001 - as the loop does before its next tick
    scheduler._tick()  # noqa: SLF001
    [first] = trials(state, search_job)
    assert first.trial_number == 0 and first.status == "queued"
