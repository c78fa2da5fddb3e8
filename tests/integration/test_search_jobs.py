"""Hyperparameter search as a job (issue 24), end to end on the tiny model: the API, the scheduler's search
driver, and each trial a job of its own in a sandboxed worker."""

from __future__ import annotations

from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.jobs.models import FineTuningJob
from tests.conftest import bearer
from tests.integration.test_evaluations import portal_headers
from tests.integration.test_image_jobs import image_model  # noqa: F401 (fixture)
from tests.integration.test_jobs import api_for, owner, qa, tiny_model, trainer, upload, wait_for  # noqa: F401 (fixtures)

#: A small space on the tiny model: 3 epochs (per-epoch reports for the pruner), few steps, no probe.
SEARCH_BODY = {
    "seed": 3, "memorization": {"extraction_probe": False},
    "method": {"type": "lora", "lora": {"hyperparameters": {
        "learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}, "lora_r": {"choice": [2, 4]},
        "n_epochs": 3, "batch_size": 8, "max_seq_length": 64, "checkpoint_every_steps": 0}}},
    "search": {"trials": 4, "max_seconds": 600, "sampler": "random", "early_stopping": "median"},
}


def test_a_search_of_four_trials_ends_with_the_model_of_the_least_validation_loss(
        client, state, tiny_model, trainer, owner):
    train_id = upload(client, owner, [qa(i) for i in range(24)])
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                       json={"model": tiny_model, "training_file": train_id, **SEARCH_BODY})
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert created["search"]["trials"] == 4 and created["search"]["trial_table"] == []
    assert created["search"]["space"]["lora_r"] == {"choice": [2, 4]}
    assert created["method"]["lora"]["hyperparameters"]["n_epochs"] == 3
    assert created["compute"]["plan"]["predicted_peak_bytes"] > 0  # planned with the largest rank
    api = api_for(client, trainer)
    job = wait_for(api, created["id"], timeout=300)
    assert job.status == "succeeded", job.error
    search = job.model_extra["search"]
    table = search["trial_table"]
    assert [r["number"] for r in table] == [0, 1, 2, 3]
    assert len({r["params"]["learning_rate"] for r in table}) == 4, table  # each trial its own values
    complete = [r for r in table if r["state"] == "complete"]
    assert len(complete) >= 2 and all(r["state"] in ("complete", "pruned") for r in table), table
    best = min(complete, key=lambda r: r["value"])
    assert search["best_trial"] == best["number"]
    trials = {r["number"]: api.fine_tuning.jobs.retrieve(r["job_id"]) for r in table}
    for number, trial in trials.items():  # each trial a job of its own, with its values
        assert trial.model_extra["search"] == {"search_id": job.id, "trial": number}
        hp = trial.method.model_extra["lora"]["hyperparameters"]
        assert hp["lora_r"] == table[number]["params"]["lora_r"] and hp["n_epochs"] == 3
        if table[number]["state"] == "complete":
            assert trial.status == "succeeded" and trial.model_extra["metrics"]["valid_loss_after"] == \
                table[number]["value"]
        else:
            assert trial.status == "cancelled"
    # the search's model is the trial's of the least validation loss, and the minimum of every finished trial
    assert job.fine_tuned_model == trials[best["number"]].fine_tuned_model
    assert job.model_extra["metrics"]["valid_loss_after"] == min(
        t.model_extra["metrics"]["valid_loss_after"] for t in trials.values() if t.status == "succeeded")
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Hyperparameter search: at most 4 trials within 600 s of wall time, sampler random, "
                            "early stopping median") for m in messages), messages
    with state.db.read() as s:
        audit = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        assert s.scalar(select(FineTuningJob.search).where(FineTuningJob.id == job.id))["best_trial"] == best["number"]
    of_search = [(e.action, e.actor) for e in audit if e.resource_id == job.id]
    assert of_search[0][0] == "job.create" and ("job.succeed", "system:search") in of_search
    create = next(e for e in audit if e.resource_id == job.id and e.action == "job.create")
    assert create.details["search"]["trials"] == 4 and create.details["search"]["sampler"] == "random"
    succeed = next(e for e in audit if e.resource_id == job.id and e.action == "job.succeed")
    assert succeed.details["best_trial"] == best["number"] and len(succeed.details["trials"]) == 4
    for number, trial in trials.items():
        actions = [e for e in audit if e.resource_id == trial.id]
        assert actions[0].action == "job.create" and actions[0].actor == "system:search"
        assert actions[0].details["search_id"] == job.id and actions[0].details["trial"] == number
        assert actions[0].details["params"] == table[number]["params"]
        assert "job.start" in [e.action for e in actions]
        if trial.status == "cancelled":  # pruned: cancelled by the search through the normal path
            cancel = next(e for e in actions if e.action == "job.cancel")
            assert cancel.reason == "pruned" and cancel.actor == "system:search"
    # the job page: the trials' table (each linking to its job) and a plot per searched parameter
    page = client.get(f"/jobs/{job.id}", headers=portal_headers(state, "trish")).text
    assert 'id="search-trials"' in page and page.count('<a href="/jobs/ftjob-') == 4, page
    assert f"{best['number']} <strong>(best)</strong>" in page
    for name in ("learning_rate", "lora_r"):
        assert f'id="search-chart-{name}"><svg role="img" aria-label="validation loss by {name}"' in page
    assert page.count("<circle") >= len(complete) and "style=" not in page.split('id="search-h"')[1]
    trial_page = client.get(f"/jobs/{table[0]['job_id']}", headers=portal_headers(state, "trish")).text
    assert f'Trial 0 of the hyperparameter search <a href="/jobs/{job.id}">' in trial_page
    # a search does not resume; its trials run as ordinary jobs of the project
    assert client.post(f"/v1/fine_tuning/jobs/{job.id}/resume", headers=bearer(trainer)).status_code == 409


def test_a_search_is_validated_naming_each_field(client, tiny_model, trainer, owner):
    train_id = upload(client, owner, [qa(i) for i in range(24)])
    body = {"model": tiny_model, "training_file": train_id,
            "method": {"type": "lora", "lora": {"hyperparameters": {
                "learning_rate": {"range": [1e-2, 1e-4], "scale": "log"}, "max_seq_length": {"choice": [32, 64]},
                "lora_r": {"choice": [4, "eight"]}}}},
            "search": {"trials": 0, "budget": 3}}
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json=body)
    assert resp.status_code == 400, resp.text
    message = resp.json()["error"]["message"]
    for field in ("method.lora.hyperparameters.learning_rate.range", "method.lora.hyperparameters.max_seq_length",
                  "method.lora.hyperparameters.lora_r.choice[1]", "search.trials", "search.budget"):
        assert field in message, message
    # a range without "search" is no plain value: the hyperparameter is named as a job's would be
    plain = {**body, "method": {"type": "lora", "lora": {"hyperparameters": {"lora_r": {"choice": [4, 8]}}}}}
    del plain["search"]
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json=plain)
    assert resp.status_code == 400 and "lora_r" in resp.json()["error"]["param"], resp.text
    assert client.get("/v1/fine_tuning/jobs", headers=bearer(trainer)).json()["data"] == []


def test_a_search_on_an_image_model_is_refused_naming_the_field(client, image_model, trainer):
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json={
        "model": image_model, "training_file": "file-missing",
        "method": {"type": "lora", "lora": {"hyperparameters": {"learning_rate": {"choice": [1e-4, 1e-3]}}}},
        "search": {"trials": 2}})
    assert resp.status_code in (400, 404), resp.text
    message = resp.json()["error"]["message"]
    assert "search: `search` varies the hyperparameters of language-model jobs" in message, message
