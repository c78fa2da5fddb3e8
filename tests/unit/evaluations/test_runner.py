"""The evaluation runner's bookkeeping with a scripted worker: how each way a worker can end is recorded."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import timedelta

import pytest
from litestar.testing import TestClient
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.db.base import utcnow
from appliance.evaluations.models import Evaluation
from appliance.evaluations.runner import BLOCKED_ANSWER, EvaluationRunner
from appliance.identity.roles import Role
from appliance.server.app import create_app
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline


class ScriptedWorker:
    """Sends ``frames`` in order, then ends; a ``stop`` makes it answer ``on_stop`` (if any) and end.

    A frame is a header, a ``(header, payload)`` pair, or a callable run when its turn comes (then the next is sent).
    """

    def __init__(self, frames: list[dict], on_stop: dict | None = None) -> None:
        self.frames, self.on_stop = list(frames), on_stop
        self.started: dict | None = None
        self.killed = False

    def start(self, header, resume=None) -> None:
        self.started = header

    def send(self, header, payload=b"") -> None:
        if header.get("type") == "stop" and self.on_stop is not None:
            self.frames.append(self.on_stop)

    def read(self, timeout: float):
        while self.frames and callable(self.frames[0]):
            self.frames.pop(0)()
        if not self.frames:
            return None
        frame = self.frames.pop(0)
        return frame if isinstance(frame, tuple) else (frame, b"")

    def alive(self) -> bool:
        return bool(self.frames) or (self.on_stop is not None and not self.killed)

    def kill(self) -> None:
        self.killed = True

    def reap(self) -> None:
        pass

    def exit_detail(self) -> str:
        return " (exit 1)"

    def cleanup(self) -> None:
        pass


def result_file_frames(document: dict) -> list[tuple[dict, bytes]]:
    """``document`` sent as the worker sends its result file: begin, one chunk, end."""
    data = json.dumps(document).encode()
    return [({"type": "begin", "kind": "result_file", "name": "evaluation.json", "size": len(data)}, b""),
            ({"type": "chunk"}, data),
            ({"type": "end", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, b"")]


class ScriptedExecutor:
    name, max_workers = "scripted", 1

    def __init__(self, worker: ScriptedWorker) -> None:
        self.worker = worker

    def launch(self, job_id, compute, reads=()):
        return self.worker

    def close(self) -> None:
        pass


@pytest.fixture
def queued(state, make_token):
    """A queued evaluation of the base model on a test file (the app's own runner is off)."""
    from appliance.modelstore import build_tiny_causal_lm

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(state.settings.home.home / "tiny-src", seed=0), "tiny")
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    with TestClient(create_app(state.settings, state, run_scheduler=False)) as client:
        record = {"prompt": "Q:", "completion": " A"}
        resp = client.post("/v1/files", headers=bearer(owner), data={"purpose": "evals"},
                           files={"file": ("t.jsonl", json.dumps(record).encode() + b"\n")})
        assert resp.status_code == 201, resp.text
        resp = client.post("/v1/evaluations", headers=bearer(trainer),
                           json={"file": resp.json()["id"], "models": ["tiny"]})
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]


def run_once(state, worker: ScriptedWorker, **options) -> Evaluation:
    runner = EvaluationRunner(state.db, state.files, state.catalog, ScriptedExecutor(worker), cancel_grace_s=0.0,
                              **options)
    evaluation_id = runner._claim()
    runner._run(evaluation_id)
    with state.db.read() as s:
        return s.get(Evaluation, evaluation_id)


def audited(state, evaluation_id: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id == evaluation_id)
                              .order_by(AuditEvent.seq)))


def test_a_result_is_recorded_with_its_figures(state, queued):
    figures = {"model": "tiny", "loss": 1.0, "perplexity": 2.718, "records": 1, "target_tokens": 2, "answered": 1,
               "exact_match": 0.0, "token_f1": 0.5}
    worker = ScriptedWorker([{"type": "event", "event_type": "metrics", "message": "Model 1/1", "data": figures},
                             {"type": "result", "results": [figures]}])
    row = run_once(state, worker)
    assert row.status == "succeeded" and row.results == [figures] and row.result_file is None
    # The worker got the test file's key and no adapter stream (a base model only).
    assert worker.started["models"] == [{"id": "tiny", "adapter": None}] and len(worker.started["datasets"]) == 1
    assert [e.action for e in audited(state, queued)][-1] == "evaluation.succeed"


def test_a_worker_error_fails_it_with_the_workers_code(state, queued):
    row = run_once(state, ScriptedWorker([{"type": "error", "code": "invalid_training_data", "param": "file[0]",
                                           "message": "file[0]: must have `messages`"}]))
    assert row.status == "failed" and row.error["code"] == "invalid_training_data" and row.error["param"] == "file[0]"
    fail = audited(state, queued)[-1]
    assert fail.action == "evaluation.fail" and fail.outcome == "failure" and fail.reason == "invalid_training_data"


def test_a_worker_that_dies_leaves_it_failed_never_running(state, queued):
    row = run_once(state, ScriptedWorker([]))
    assert row.status == "failed" and row.error["code"] == "worker_lost"


def test_a_cancel_reaches_the_running_worker(state, queued):
    with state.db.transaction() as s:
        s.get(Evaluation, queued).cancel_requested = True  # as POST .../cancel does once it runs
    worker = ScriptedWorker([], on_stop={"type": "cancelled"})
    row = run_once(state, worker)
    assert row.status == "cancelled"
    assert audited(state, queued)[-1].action == "evaluation.cancelled"


def test_an_evaluation_whose_runner_went_away_is_failed(state, queued):
    with state.db.transaction() as s:
        row = s.get(Evaluation, queued)
        row.status, row.worker, row.lease_expires_at = "running", "gone:1:abc", utcnow() - timedelta(seconds=1)
    runner = EvaluationRunner(state.db, state.files, state.catalog, ScriptedExecutor(ScriptedWorker([])))
    assert runner.recover() == 1
    with state.db.read() as s:
        assert s.get(Evaluation, queued).error["code"] == "worker_lost"


class HeldWorker(ScriptedWorker):
    """Runs until ``release`` is set, then sends ``result`` and ends."""

    def __init__(self, result: dict) -> None:
        super().__init__([])
        self.result, self.release = result, threading.Event()

    def read(self, timeout: float):
        if self.release.wait(min(timeout, 0.05)) and self.result is not None:
            result, self.result = self.result, None
            return result, b""
        return None

    def alive(self) -> bool:
        return self.result is not None


def _status(state, model, row_id: str) -> str:
    with state.db.read() as s:
        return s.get(model, row_id).status


def test_training_waits_for_a_running_evaluation_on_this_host(state, queued):
    from appliance.identity.models import Project
    from appliance.jobs.models import FineTuningJob

    runner, scheduler = state.evaluation_runner, state.scheduler
    assert scheduler.busy == runner.running  # wired by the server (jobs never import evaluations)
    with state.db.transaction() as s:
        project_id = s.scalar(select(Project.id).where(Project.name == "acme"))
        s.add(FineTuningJob(id="ftjob-waits", project_id=project_id, created_by="trish", model="missing-model",
                            training_file="file-x", seed=1, method_type="lora", status="queued"))
    # Of the two looking at once, each sees the other looking: the scheduler says so while it looks.
    seen: list[bool] = []
    scheduler.busy = lambda: seen.append(scheduler.holds_device()) or True
    scheduler._tick()
    assert seen == [True] and not scheduler.holds_device() and _status(state, FineTuningJob, "ftjob-waits") == "queued"
    scheduler.busy = runner.running

    figures = {"model": "tiny", "loss": 1.0, "perplexity": 2.718, "records": 1, "target_tokens": 2, "answered": 1}
    worker = HeldWorker({"type": "result", "results": [figures]})
    runner.executor = ScriptedExecutor(worker)
    runner.start()
    try:
        deadline = Deadline(20)
        while worker.started is None and deadline:
            time.sleep(0.02)
        assert runner.running()
        scheduler._tick()  # the evaluation holds the device: the job stays queued
        assert _status(state, FineTuningJob, "ftjob-waits") == "queued"
        worker.release.set()
        while _status(state, Evaluation, queued) == "running" and deadline:
            time.sleep(0.02)
        assert _status(state, Evaluation, queued) == "succeeded"
    finally:
        runner.stop()
    assert not runner.running()
    scheduler._tick()  # claimed now (and failed at once: its model is not in the store)
    assert _status(state, FineTuningJob, "ftjob-waits") == "failed"


class ReportingWorker(HeldWorker):
    """Sends ``reports`` first, then holds until ``release`` like :class:`HeldWorker`."""

    def __init__(self, reports: list[dict], result: dict) -> None:
        super().__init__(result)
        self.reports = list(reports)

    def read(self, timeout: float):
        if self.reports:
            return self.reports.pop(0), b""
        return super().read(timeout)


def test_a_running_evaluation_shows_how_far_it_is(state, queued, make_token):
    from tests.integration.test_evaluations import portal_headers

    progress = {"model": 2, "models": 2, "phase": "answers", "done": 8, "total": 16, "seconds_left": 3.5}
    reports = [{"type": "event", "event_type": "progress", "message": "Model 2/2: answers 8 of 16", "data": progress},
               # a report that is not one (text where a phase goes) is dropped, not kept
               {"type": "event", "event_type": "progress", "message": "x", "data": {**progress, "phase": "Item 0"}}]
    figures = {"model": "tiny", "loss": 1.0, "perplexity": 2.718, "records": 1, "target_tokens": 2, "answered": 1}
    worker = ReportingWorker(reports, {"type": "result", "results": [figures]})
    runner = EvaluationRunner(state.db, state.files, state.catalog, ScriptedExecutor(worker), poll_s=0.05)
    trainer = make_token("trish", Role.TRAINER, "acme")
    runner.start()
    try:
        with TestClient(create_app(state.settings, state, run_scheduler=False)) as client:
            deadline = Deadline(20)
            while deadline and (body := client.get(f"/v1/evaluations/{queued}", headers=bearer(trainer)).json()
                                )["progress"] is None:
                time.sleep(0.05)
            time.sleep(0.2)  # the malformed report after it has been read and dropped
            body = client.get(f"/v1/evaluations/{queued}", headers=bearer(trainer)).json()
            assert body["status"] == "running" and body["progress"] == progress, body
            html = client.get(f"/evaluations/{queued}", headers=portal_headers(state, "trish")).text
            assert 'id="evaluation-progress"' in html and "Model 2 of 2" in html and "8 of 16" in html
            assert "about 4 s left" in html
            html = client.get("/evaluations", headers=portal_headers(state, "trish")).text
            assert "answers 8/16" in html
            worker.release.set()
            while deadline and body["status"] == "running":
                body = client.get(f"/v1/evaluations/{queued}", headers=bearer(trainer)).json()
                time.sleep(0.05)
            assert body["status"] == "succeeded" and body["progress"] is None, body
    finally:
        runner.stop()
    with state.db.read() as s:
        assert s.get(Evaluation, queued).progress is None


def test_figures_that_are_not_finite_are_stored_as_not_measured(state, queued, make_token):
    """NaN (a loss with no target tokens) from any worker is None in the row and the audit: PostgreSQL's json
    refuses NaN, which left the evaluation running until its lease expired. The page and the API say so."""
    from tests.integration.test_evaluations import portal_headers

    figures = {"model": "tiny", "loss": float("nan"), "perplexity": float("inf"), "records": 1, "target_tokens": 0,
               "answered": 0, "exact_match": None, "token_f1": None}
    row = run_once(state, ScriptedWorker([{"type": "result", "results": [figures, "not figures"]}]))
    assert row.status == "succeeded", row.error
    assert row.results == [{**figures, "loss": None, "perplexity": None}]
    succeed = audited(state, queued)[-1]
    assert succeed.action == "evaluation.succeed" and succeed.details["results"][0]["loss"] is None
    trainer = make_token("trish", Role.TRAINER, "acme")
    with TestClient(create_app(state.settings, state, run_scheduler=False)) as client:
        body = client.get(f"/v1/evaluations/{queued}", headers=bearer(trainer)).json()
        assert body["results"][0]["loss"] is None and body["results"][0]["perplexity"] is None, body
        html = client.get(f"/evaluations/{queued}", headers=portal_headers(state, "trish")).text
        assert html.count("not measured") >= 2 and 'id="results"' in html
        html = client.get("/models", headers=portal_headers(state, "trish")).text
        assert "loss not measured" in html


def test_a_fine_tune_of_another_project_fails_it_before_any_worker_starts(state, queued, make_token):
    from sqlalchemy import update

    from appliance.identity.models import Project

    make_token("tom", Role.TRAINER, "globex")
    with state.db.transaction() as s:
        globex = s.scalar(select(Project).where(Project.name == "globex"))
        state.catalog.publish(s, CLI_CTX, adapter_id="ft:tiny:globex:x:ftjob-g", job_id="ftjob-g", project=globex,
                              base_model="tiny", kind="lora", files={"adapter_config.json": b"{}"},
                              manifest={"job_id": "ftjob-g"})
        # queued before creation refused another project's fine-tunes
        s.execute(update(Evaluation).where(Evaluation.id == queued)
                  .values(models=["tiny", "ft:tiny:globex:x:ftjob-g"]))
    worker = ScriptedWorker([{"type": "result", "results": []}])
    row = run_once(state, worker)
    assert worker.started is None and row.status == "failed", row.error
    assert row.error["code"] == "model_not_found" and row.error["param"] == "models[1]", row.error
    assert "not a fine-tune of the evaluation's project" in row.error["message"]


def stored_result(state, file_id: str) -> dict:
    with state.db.read() as s:
        return json.loads(b"".join(state.blobs.read(s, file_id)))


def test_answers_pass_the_projects_output_guard_before_the_result_file_is_stored(state, queued):
    """As inference's answers: redacted where the policy redacts, withheld where it blocks; the figures are the
    worker's, on the raw answers."""
    answers = ["Write to jane.doe@example.com for the forms.", "Use the key AKIAIOSFODNN7EXAMPLE to upload.",
               "The sky is blue.", None]
    document = {"format": "appliance.evaluation/1", "models": ["tiny"], "results": [],
                "samples": [{"prompt": f"Q{i}", "reference": "R", "answers": {"tiny": a}}
                            for i, a in enumerate(answers)]}
    figures = {"model": "tiny", "loss": 1.0, "perplexity": 2.7, "records": 4, "target_tokens": 8, "answered": 3,
               "exact_match": 0.0, "token_f1": 0.25}
    row = run_once(state, ScriptedWorker([*result_file_frames(document), {"type": "result", "results": [figures]}]))
    assert row.status == "succeeded" and row.results == [figures], row.error
    said = [smp["answers"]["tiny"] for smp in stored_result(state, row.result_file)["samples"]]
    assert said[0] == "Write to <EMAIL_ADDRESS> for the forms."
    assert said[1] == BLOCKED_ANSWER and said[2:] == ["The sky is blue.", None]
    with state.db.read() as s:
        stored = s.scalar(select(AuditEvent).where(AuditEvent.action == "file.result",
                                                   AuditEvent.resource_id == row.result_file))
    assert stored.details["guard"] == {"redacted": {"EMAIL_ADDRESS": 1}, "blocked": {"AWS_ACCESS_KEY_ID": 1},
                                       "refused": True}, stored.details
    assert stored.details["bytes"] == len(json.dumps(stored_result(state, row.result_file), ensure_ascii=False))


def test_a_text_result_file_that_is_not_one_fails_it_and_nothing_is_stored(state, queued):
    from appliance.files.models import StoredFile

    frames = result_file_frames({"samples": [{"answers": "not a mapping"}]})
    row = run_once(state, ScriptedWorker([*frames, {"type": "result", "results": []}]))
    assert row.status == "failed" and row.error["code"] == "invalid_result" and row.result_file is None, row.error
    with state.db.read() as s:
        assert s.scalar(select(StoredFile.id).where(StoredFile.purpose == "fine-tune-results")) is None


def test_answers_the_guard_cannot_judge_are_not_stored(state, queued):
    from appliance.files.models import StoredFile

    class BrokenScanner:
        def scan(self, units, *, entities=None):
            raise RuntimeError("the scanner broke")

    document = {"samples": [{"prompt": "Q", "reference": "R", "answers": {"tiny": "Write to jane.doe@example.com"}}]}
    row = run_once(state, ScriptedWorker([*result_file_frames(document), {"type": "result", "results": []}]),
                   scanner=BrokenScanner)
    assert row.status == "failed" and row.error["code"] == "output_guard_failed", row.error
    assert "nothing was stored" in row.error["message"] and row.result_file is None
    with state.db.read() as s:
        assert s.scalar(select(StoredFile.id).where(StoredFile.purpose == "fine-tune-results")) is None
