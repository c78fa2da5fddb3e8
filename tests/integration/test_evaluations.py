"""Evaluations end to end on a tiny model: a test file, a base model and a fine-tune compared in a sandboxed worker."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.models import Project
from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline
from tests.unit.evaluations.test_task import lora_files

TERMINAL = {"succeeded", "failed", "cancelled"}


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def qa(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is item {i}?"},
                         {"role": "assistant", "content": f"Item {i} is a blue box"}]}


@pytest.fixture
def tiny_model(state, tmp_path) -> str:
    from appliance.modelstore import build_tiny_causal_lm

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(tmp_path / "tiny-src", seed=0), "tiny-llama")
    return "tiny-llama"


@pytest.fixture
def trainer(make_token) -> str:
    return make_token("trish", Role.TRAINER, "acme")


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


def upload(client, owner: str, records, purpose: str) -> str:
    resp = client.post("/v1/files", headers=bearer(owner), data={"purpose": purpose},
                       files={"file": ("test.jsonl", jsonl(records))})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def publish_adapter(state, base_dir, base_name: str, project: str) -> str:
    """A LoRA fine-tune of the tiny model with non-zero weights (so it answers differently), published."""
    files = lora_files(base_dir, seed=0, rank=4)
    adapter_id = f"ft:{base_name}:{project}:evaltest:ftjob-evaltest"
    with state.db.transaction() as s:
        row = s.scalar(select(Project).where(Project.name == project))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id="ftjob-evaltest", project=row,
                              base_model=base_name, kind="lora", files=files, manifest={"job_id": "ftjob-evaltest"})
    return adapter_id


def portal_headers(state, user: str) -> dict[str, str]:
    from appliance.identity.sessions import COOKIE

    state.sessions.set_password(CLI_CTX, user, "correct horse battery staple")
    cookie = state.sessions.login(user, "correct horse battery staple", "testclient")
    return {"Cookie": f"{COOKIE}={cookie}", "X-CSRF-Token": state.sessions.resolve(cookie).csrf_token}


def wait_for(client, token: str, evaluation_id: str, timeout: float = 120) -> dict:
    deadline = Deadline(timeout)
    while deadline:
        body = client.get(f"/v1/evaluations/{evaluation_id}", headers=bearer(token)).json()
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.3)
    raise AssertionError(f"evaluation {evaluation_id} still {body['status']} after {timeout}s")


def test_a_base_model_and_its_fine_tune_compared_on_a_test_file(client, state, tiny_model, trainer, owner):
    test_file = upload(client, owner, [qa(i) for i in range(6)] + [{"text": "plain text has no reference"}], "evals")
    train_file = upload(client, owner, [qa(i) for i in range(6)], "fine-tune")
    # A test file never trains: refused as either file of a job, naming the field.
    for field in ("training_file", "validation_file"):
        body = {"model": tiny_model, "training_file": train_file, field: test_file}
        resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == field and "test file" in error["message"], error
    base_dir = state.catalog.get_base_model(tiny_model).path
    adapter = publish_adapter(state, base_dir, tiny_model, "acme")

    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": [tiny_model, adapter], "samples": 2, "max_tokens": 6})
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert created["status"] in ("queued", "running") and created["id"].startswith("eval-")
    done = wait_for(client, trainer, created["id"])
    assert done["status"] == "succeeded", done["error"]
    base, tuned = done["results"]
    assert (base["model"], tuned["model"]) == (tiny_model, adapter)
    for result in (base, tuned):
        assert result["records"] == 7 and result["answered"] == 6 and result["target_tokens"] > 0
        assert result["perplexity"] == pytest.approx(__import__("math").exp(result["loss"]), rel=1e-6)
        assert 0 <= result["exact_match"] <= 1 and 0 <= result["token_f1"] <= 1
    assert base["loss"] != pytest.approx(tuned["loss"])  # the adapter is applied, and only to its own model
    assert base["target_tokens"] == tuned["target_tokens"]
    # The generations are text: an encrypted result file the data owner reads, never in the evaluation object.
    assert "Item 0" not in json.dumps(done)
    file_id = done["result_file"]
    assert client.get(f"/v1/files/{file_id}/content", headers=bearer(trainer)).status_code == 403
    report = client.get(f"/v1/files/{file_id}/content", headers=bearer(owner)).json()
    assert report["format"] == "appliance.evaluation/1" and report["models"] == [tiny_model, adapter]
    assert [s["reference"] for s in report["samples"]] == ["Item 0 is a blue box", "Item 1 is a blue box"]
    assert all(set(s["answers"]) == {tiny_model, adapter} for s in report["samples"])
    assert report["samples"][0]["prompt"].find("What is item 0?") >= 0
    with state.db.read() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id == created["id"])))
    assert [e.action for e in events] == ["evaluation.create", "evaluation.start", "evaluation.succeed"], events
    isolation = events[-1].details["worker_isolation"]  # the training workers' sandbox
    assert isolation["level"] == "sandbox" and isolation["isolated"] is True, isolation
    listed = client.get("/v1/evaluations", headers=bearer(trainer)).json()
    assert [e["id"] for e in listed["data"]] == [created["id"]]
    # The portal: the figures for everyone who reads jobs; the generations side by side for data owners only.
    html = client.get(f"/evaluations/{created['id']}", headers=portal_headers(state, "olivia")).text
    assert 'id="results"' in html and adapter in html and 'id="samples"' in html
    assert "Item 0 is a blue box" in html
    html = client.get(f"/evaluations/{created['id']}", headers=portal_headers(state, "trish")).text
    assert 'id="results"' in html and 'id="samples-note"' in html and "Item 0 is a blue box" not in html
    html = client.get("/evaluations", headers=portal_headers(state, "trish")).text
    assert created["id"] in html and test_file in html  # the list, and the test file offered in the form


def test_requests_are_checked_field_by_field_and_cancelled_while_queued(client, state, tiny_model, trainer, owner):
    test_file = upload(client, owner, [qa(1)], "evals")
    train_file = upload(client, owner, [qa(1)], "fine-tune")
    resp = client.post("/v1/evaluations", headers=bearer(trainer), json={"file": train_file, "models": []})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "models: " in message and f"file: file {train_file!r} has purpose 'fine-tune'" in message, message
    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": [tiny_model], "samples": 999})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "samples"
    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": [tiny_model], "seed": 3})  # an image model's option
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed", resp.text
    assert "`seed` applies to image models; 'tiny-llama' runs on a text model" in resp.json()["error"]["message"]
    resp = client.post("/v1/evaluations", headers=bearer(trainer), json={"file": test_file, "models": ["nope"]})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "models[0]", resp.text
    state.evaluation_runner.stop()  # nothing claims it: cancelled while queued
    created = client.post("/v1/evaluations", headers=bearer(trainer),
                          json={"file": test_file, "models": [tiny_model]}).json()
    resp = client.post(f"/v1/evaluations/{created['id']}/cancel", headers=bearer(trainer))
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    resp = client.post(f"/v1/evaluations/{created['id']}/cancel", headers=bearer(trainer))
    assert resp.status_code == 409
    # The portal's form: the same checks, shown above the form; a valid one is created and can be cancelled.
    headers = portal_headers(state, "trish")
    resp = client.post("/evaluations", headers=headers, data={"file": test_file, "samples": "3", "max_tokens": "8"},
                       follow_redirects=False)
    assert resp.status_code == 400 and "`models` must be a list of 1 to 4" in resp.text
    resp = client.post("/evaluations", headers=headers, follow_redirects=False,
                       data={"file": test_file, "model1": tiny_model, "samples": "3", "max_tokens": "8"})
    assert resp.status_code == 303, resp.text
    evaluation_id = resp.headers["location"].rsplit("/", 1)[1]
    resp = client.post(f"/evaluations/{evaluation_id}/cancel", headers=headers, follow_redirects=False)
    assert resp.status_code == 303
    assert client.get(f"/v1/evaluations/{evaluation_id}", headers=bearer(trainer)).json()["status"] == "cancelled"


def test_the_model_catalogue_shows_each_base_models_latest_evaluation_in_the_viewers_projects(
        client, state, tiny_model, trainer, make_token):
    from datetime import UTC, datetime

    from appliance.evaluations.models import Evaluation

    make_token("tom", Role.TRAINER, "globex")
    make_token("carl", Role.CONSUMER, "acme")
    with state.db.transaction() as s:
        projects = dict(s.execute(select(Project.name, Project.id)).all())

        def add(eval_id: str, project: str, status: str, minute: int, loss: float) -> None:
            s.add(Evaluation(id=eval_id, project_id=projects[project], created_by="trish", file=f"file-{eval_id}",
                             models=[tiny_model], base_model=tiny_model, samples=0, max_tokens=4, status=status,
                             finished_at=datetime(2026, 12, 1, 0, minute, tzinfo=UTC),
                             results=[{"model": tiny_model, "loss": loss, "perplexity": 2.0, "records": 3,
                                       "target_tokens": 9, "answered": 3, "exact_match": 0.5, "token_f1": 0.625}]))

        add("eval-acme-old", "acme", "succeeded", 1, 1.11111)
        add("eval-acme-new", "acme", "succeeded", 2, 2.22222)
        add("eval-acme-failed", "acme", "failed", 3, 3.33333)
        add("eval-globex", "globex", "succeeded", 4, 4.44444)
    html = client.get("/models", headers=portal_headers(state, "trish")).text
    assert 'href="/evaluations/eval-acme-new"' in html and "loss 2.2222" in html and "EM 0.500" in html, html
    assert "F1 0.625" in html
    assert "eval-acme-old" not in html and "eval-acme-failed" not in html and "eval-globex" not in html
    html = client.get("/models", headers=portal_headers(state, "tom")).text
    assert 'href="/evaluations/eval-globex"' in html and "loss 4.4444" in html and "eval-acme" not in html
    html = client.get("/models", headers=portal_headers(state, "carl")).text  # models, not evaluations
    assert "Latest evaluation" not in html and "eval-" not in html and tiny_model in html


def publish_stub(state, base_name: str, project: str, job: str) -> str:
    """A published fine-tune of ``project`` whose files are never loaded (for requests refused before a run)."""
    adapter_id = f"ft:{base_name}:{project}:stub:{job}"
    with state.db.transaction() as s:
        row = s.scalar(select(Project).where(Project.name == project))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=job, project=row, base_model=base_name,
                              kind="lora", files={"adapter_config.json": b"{}"}, manifest={"job_id": job})
    return adapter_id


def test_a_missing_or_foreign_fine_tune_is_a_404_naming_its_place_in_models(client, state, tiny_model, trainer,
                                                                            owner, make_token):
    make_token("tom", Role.TRAINER, "globex")
    foreign = publish_stub(state, tiny_model, "globex", "ftjob-foreign")
    test_file = upload(client, owner, [qa(1)], "evals")
    missing = f"ft:{tiny_model}:acme:gone:ftjob-gone"
    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": [tiny_model, missing]})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "models[1]", resp.text
    resp = client.post("/v1/evaluations", headers=bearer(trainer), json={"file": test_file, "models": [foreign]})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "models[0]", resp.text
    with state.db.read() as s:  # another project's: answered as missing, audited as a denial
        denial = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")
                           .order_by(AuditEvent.seq.desc())).first()
    assert denial is not None and denial.actor == "trish", denial


def test_another_projects_fine_tune_is_refused_even_for_an_administrator(client, state, tiny_model, owner,
                                                                         make_token):
    """The result file is the test file's project's: another project's fine-tune never runs into it."""
    state.evaluation_runner.stop()  # nothing runs: the stubs are never loaded
    admin = make_token("ada", Role.ADMIN)
    globex_owner = make_token("gina", Role.DATA_OWNER, "globex")
    foreign = publish_stub(state, tiny_model, "globex", "ftjob-foreign")
    own = publish_stub(state, tiny_model, "acme", "ftjob-own")
    test_file = upload(client, owner, [qa(1)], "evals")
    resp = client.post("/v1/evaluations", headers={**bearer(admin), "OpenAI-Project": "acme"},
                       json={"file": test_file, "models": [own, foreign]})
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert error["param"] == "models[1]" and "not found in project 'acme'" in error["message"], error
    # The portal's form lists every project's test files and fine-tunes to an administrator: the test files
    # with their project, and a fine-tune of another project is refused at its field.
    globex_file = upload(client, globex_owner, [qa(2)], "evals")
    headers = portal_headers(state, "ada")
    html = client.get("/evaluations", headers=headers).text
    assert f"{test_file} · project acme" in html and f"{globex_file} · project globex" in html
    resp = client.post("/evaluations", headers=headers, follow_redirects=False,
                       data={"file": test_file, "model1": tiny_model, "model2": foreign, "samples": "1",
                             "max_tokens": "4"})
    assert resp.status_code == 400, resp.text
    field = resp.text.split('id="model2-err"', 1)[1].split("</span>", 1)[0]
    assert "not found in project &#39;acme&#39;" in field, field
    assert 'aria-describedby="model2-err" aria-invalid="true"' in resp.text
    resp = client.post("/evaluations", headers=headers, follow_redirects=False,
                       data={"file": globex_file, "model1": tiny_model, "model2": foreign, "samples": "1",
                             "max_tokens": "4"})
    assert resp.status_code == 303, resp.text  # the same fine-tune on its own project's test file
