"""An evaluation's result file (test records, the fine-tunes' generations) never outlives what it copies: it is
crypto-shredded with its test file or a fine-tune it ran (a user's deletion, a withdrawal, retention), and a
run whose test file or fine-tune went meanwhile keeps nothing. Scripted workers: the bookkeeping is checked."""

from __future__ import annotations

from datetime import timedelta

import pytest
from litestar.testing import TestClient
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.db.base import utcnow
from appliance.evaluations.models import Evaluation
from appliance.files.models import StoredFile
from appliance.identity.models import Project
from appliance.identity.roles import Role
from appliance.server.app import create_app
from appliance.storage.models import DataKey
from tests.conftest import CLI_CTX, bearer
from tests.integration.test_evaluations import portal_headers, qa, upload
from tests.integration.test_retention import assert_shredded, set_retention
from tests.unit.evaluations.test_runner import ScriptedWorker, result_file_frames, run_once

BASE = "tiny"
SECRET = "Item 7 is kept in the blue box"


@pytest.fixture
def app(state, make_token):
    """The API without background services (the tests run the evaluations), the tiny model, an owner and a
    trainer of acme."""
    from appliance.modelstore import build_tiny_causal_lm

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(state.settings.home.home / "tiny-src", seed=0), BASE)
    tokens = {"owner": make_token("olivia", Role.DATA_OWNER, "acme"), "trainer": make_token("trish", Role.TRAINER,
                                                                                                "acme")}
    with TestClient(create_app(state.settings, state, run_scheduler=False)) as client:
        yield client, tokens


def publish(state, tag: str, *, trained_on: tuple[str, ...] = ()) -> str:
    adapter_id = f"ft:{BASE}:acme:{tag}:ftjob-{tag}"
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=f"ftjob-{tag}", project=project,
                              base_model=BASE, kind="lora", files={"adapter_config.json": b"{}"},
                              manifest={"job_id": f"ftjob-{tag}", "datasets": [{"id": f} for f in trained_on]})
    return adapter_id


def evaluate(app, state, models: list[str], *, before_result=()) -> tuple[str, str, Evaluation]:
    """Upload a test file and run an evaluation of ``models`` on it (a scripted worker sends a result file;
    ``before_result`` run first); the test file's id, the evaluation's id and its row."""
    client, tokens = app
    test_file = upload(client, tokens["owner"], [qa(7)], "evals")
    resp = client.post("/v1/evaluations", headers=bearer(tokens["trainer"]), json={"file": test_file,
                                                                                    "models": models})
    assert resp.status_code == 200, resp.text
    figures = [{"model": m, "loss": 1.0, "perplexity": 2.7, "records": 1, "target_tokens": 3, "answered": 1,
                "exact_match": 0.0, "token_f1": 0.5} for m in models]
    document = {"format": "appliance.evaluation/1", "models": models, "results": figures,
                "samples": [{"prompt": "What is item 7?", "reference": SECRET, "answers": dict.fromkeys(models, "a")}]}
    row = run_once(state, ScriptedWorker([*before_result, *result_file_frames(document),
                                          {"type": "result", "results": figures}]))
    return test_file, resp.json()["id"], row


def deletions(state, file_id: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == "file.delete",
                                                       AuditEvent.resource_id == file_id)))


def assert_erased(app, state, evaluation_id: str, result_file: str, because: str) -> None:
    """The result file is shredded (audited, naming the evaluation), and the API and the page say why."""
    client, tokens = app
    assert_shredded(state, result_file)
    assert client.get(f"/v1/files/{result_file}/content", headers=bearer(tokens["owner"])).status_code == 404
    (event,) = deletions(state, result_file)
    assert event.reason == f"evaluation result: {because}" and event.actor in ("olivia", "system:retention")
    assert event.details["evaluation_id"] == evaluation_id and event.details["crypto_shred"], event.details
    body = client.get(f"/v1/evaluations/{evaluation_id}", headers=bearer(tokens["trainer"])).json()
    assert body["status"] == "succeeded" and body["result_erased_reason"] == because, body
    assert body["result_erased_at"] and body["result_file"] == result_file and body["results"]
    html = client.get(f"/evaluations/{evaluation_id}", headers=portal_headers(state, "olivia")).text
    assert 'id="samples-erased"' in html and because in html and SECRET not in html
    assert 'id="results"' in html  # the figures stay


def test_deleting_the_test_file_shreds_the_result_files_that_copy_it(app, state):
    client, tokens = app
    test_file, evaluation_id, row = evaluate(app, state, [BASE])
    assert row.status == "succeeded" and row.result_file is not None
    result = client.get(f"/v1/files/{row.result_file}/content", headers=bearer(tokens["owner"]))
    assert result.status_code == 200 and SECRET in result.text  # the copy of the test record

    assert client.delete(f"/v1/files/{test_file}", headers=bearer(tokens["owner"])).status_code == 200
    assert_erased(app, state, evaluation_id, row.result_file, f"its test file {test_file} was deleted")
    (test_deletion,) = deletions(state, test_file)
    (result_deletion,) = deletions(state, row.result_file)
    assert result_deletion.seq == test_deletion.seq + 1  # in the deletion's own transaction, right after it


def test_a_test_file_deleted_while_it_runs_leaves_no_result(app, state):
    client, tokens = app
    with state.db.read() as s:
        before = s.scalar(select(StoredFile.id).where(StoredFile.purpose == "fine-tune-results"))
    deleted: list[str] = []

    def delete_test_file() -> None:  # while the worker runs: the runner is told to stop, and keeps nothing
        with state.db.read() as s:
            file_id = s.scalar(select(Evaluation.file).where(Evaluation.status == "running"))
        assert client.delete(f"/v1/files/{file_id}", headers=bearer(tokens["owner"])).status_code == 200
        deleted.append(file_id)

    test_file, evaluation_id, row = evaluate(app, state, [BASE], before_result=[delete_test_file])
    assert deleted == [test_file] and before is None
    assert row.status == "failed" and row.error["code"] == "test_file_deleted", row.error
    assert row.error["param"] == "file" and row.result_file is None and row.results == []
    assert row.cancel_requested  # the deletion told the running evaluation to stop
    with state.db.read() as s:  # no result file was registered, and its ciphertext was discarded
        assert s.scalar(select(StoredFile.id).where(StoredFile.purpose == "fine-tune-results")) is None
        fail = s.scalars(select(AuditEvent).where(AuditEvent.resource_id == evaluation_id)
                         .order_by(AuditEvent.seq.desc())).first()
    assert fail.action == "evaluation.fail" and fail.reason == "test_file_deleted"
    with state.db.read() as s:  # every ciphertext left on disk has a live key: the result's was discarded
        keyed = {k.object_id for k in s.scalars(select(DataKey).where(DataKey.wrapped.is_not(None)))}
    assert {p.name.removesuffix(".blob") for p in state.blobs.root.rglob("*.blob")} <= keyed


def test_a_fine_tune_deleted_while_it_runs_leaves_no_result(app, state):
    adapter = publish(state, "mid")
    delete = lambda: state.catalog.delete_adapter(None, CLI_CTX, adapter, reason="test")  # noqa: E731
    _, evaluation_id, row = evaluate(app, state, [BASE, adapter], before_result=[delete])
    assert row.status == "failed" and row.error["code"] == "model_deleted", row.error
    assert row.error["param"] == "models[1]" and row.result_file is None


def test_a_withdrawn_fine_tune_takes_the_results_holding_its_generations(app, state):
    """Deleting training data withdraws the adapter trained on it; the evaluations that ran it lose their
    result files too, in the adapter's deletion's transaction."""
    client, tokens = app
    train_file = upload(client, tokens["owner"], [qa(1)], "fine-tune")
    adapter = publish(state, "withdrawn", trained_on=(train_file,))
    other = publish(state, "kept")
    _, erased_id, erased = evaluate(app, state, [BASE, adapter])
    _, kept_id, kept = evaluate(app, state, [BASE, other])
    assert client.delete(f"/v1/files/{train_file}", headers=bearer(tokens["owner"])).status_code == 200
    assert_erased(app, state, erased_id, erased.result_file, f"its model {adapter} was deleted")
    with state.db.read() as s:
        adapter_deletion = s.scalar(select(AuditEvent).where(AuditEvent.action == "adapter.delete",
                                                             AuditEvent.resource_id == adapter))
        assert s.get(Evaluation, kept_id).result_erased_at is None
    assert deletions(state, erased.result_file)[0].seq == adapter_deletion.seq + 1
    resp = client.get(f"/v1/files/{kept.result_file}/content", headers=bearer(tokens["owner"]))
    assert resp.status_code == 200 and SECRET in resp.text  # another fine-tune's evaluation is untouched


def test_retention_shreds_an_expired_test_files_result_files(app, state, admin_token):
    client, _ = app
    test_file, evaluation_id, row = evaluate(app, state, [BASE])
    set_retention(client, admin_token, "acme", datasets="1d")
    swept = state.retention.sweep(now=utcnow() + timedelta(days=2))
    assert test_file in {e.id for e in swept.expired} and not swept.errors, swept
    assert_erased(app, state, evaluation_id, row.result_file, f"its test file {test_file} was deleted")


def test_a_result_file_deleted_by_hand_is_shown_as_erased(app, state):
    client, tokens = app
    _, evaluation_id, row = evaluate(app, state, [BASE])
    assert client.delete(f"/v1/files/{row.result_file}", headers=bearer(tokens["owner"])).status_code == 200
    body = client.get(f"/v1/evaluations/{evaluation_id}", headers=bearer(tokens["trainer"])).json()
    assert body["result_erased_reason"] == "the result file was deleted" and body["result_erased_at"], body
    html = client.get(f"/evaluations/{evaluation_id}", headers=portal_headers(state, "olivia")).text
    assert 'id="samples-erased"' in html and "the result file was deleted" in html


def test_a_jobs_result_files_go_with_the_training_or_validation_file_they_were_made_from(app, state, admin_token):
    """A job's sample generations hold validation prompts and references: deleting its validation file (or
    its training file, or retention) shreds them in the same transaction; another job's stay."""
    from appliance.files.service import new_file_id
    from appliance.jobs.models import FineTuningJob

    client, tokens = app
    train, valid, other_train = (upload(client, tokens["owner"], [qa(i)], "fine-tune") for i in (1, 2, 3))

    def finished_job(job_id: str, training: str, validation: str | None) -> str:
        writer = state.files.blobs.create(new_file_id(), "acme", "file")
        writer.write(('{"samples": [{"prompt": "What is item 7?", "reference": "%s"}]}' % SECRET).encode())
        result, key_row = writer.object_id, writer.finish()
        with state.db.transaction() as s:
            project = s.scalar(select(Project).where(Project.name == "acme"))
            s.add(key_row)
            state.files.add_result_file(s, file_id=result, project_id=project.id, filename=f"{job_id}-samples.json",
                                        size=10, sha256="0" * 64, created_by="trish", generated_by=job_id)
            s.add(FineTuningJob(id=job_id, project_id=project.id, created_by="trish", model=BASE, seed=1,
                                training_file=training, validation_file=validation, method_type="lora",
                                hyperparameters={}, status="succeeded", result_files=[result]))
        return result

    erased = finished_job("ftjob-erased", train, valid)
    kept = finished_job("ftjob-kept", other_train, None)
    assert client.delete(f"/v1/files/{valid}", headers=bearer(tokens["owner"])).status_code == 200
    assert_shredded(state, erased)
    [deletion] = deletions(state, erased)
    assert deletion.details["job_id"] == "ftjob-erased" and deletion.details["erased_with"] == {"file": valid}
    assert deletion.seq == deletions(state, valid)[0].seq + 1  # in the validation file's deletion's transaction
    resp = client.get(f"/v1/files/{kept}/content", headers=bearer(tokens["owner"]))
    assert resp.status_code == 200 and SECRET in resp.text
    set_retention(client, admin_token, "acme", datasets="1d")  # retention takes the same path
    swept = state.retention.sweep(now=utcnow() + timedelta(days=2))
    assert other_train in {e.id for e in swept.expired} and not swept.errors, swept
    assert_shredded(state, kept)
