"""A compliance report over a scripted scenario holds every fact and none of the raw personal data."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime, timedelta

import openai
import pytest

from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer

EMAIL = "maria.gonzalez.77@example.org"
PHONE = "+44 20 7946 0958"


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture
def scenario(client, state, make_token, tmp_path):
    """Two projects; uploads with PII; a job; queries; a denial; a deletion; a key rotation."""
    from appliance.modelstore import build_tiny_causal_lm
    from appliance.storage.rotation import rotate_keys

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(tmp_path / "tiny", seed=0), "tiny-llama")
    acme_owner = make_token("olivia", Role.DATA_OWNER, "acme")
    globex_owner = make_token("gus", Role.DATA_OWNER, "globex")
    trainer = make_token("trish", Role.TRAINER, "acme")
    consumer = make_token("carl", Role.CONSUMER, "acme")
    records = [{"messages": [{"role": "user", "content": f"Question {i}: who handles billing?"},
                             {"role": "assistant", "content": f"Write to {EMAIL} or call {PHONE}."}]}
               for i in range(12)]
    train = client.post("/v1/files", headers=bearer(acme_owner), data={"purpose": "fine-tune"},
                        files={"file": ("billing.jsonl", jsonl(records))}).json()["id"]
    doomed = client.post("/v1/files", headers=bearer(globex_owner), data={"purpose": "fine-tune"},
                         files={"file": ("old.jsonl", jsonl(records[:2]))}).json()["id"]
    client.get(f"/v1/files/{train}/content", headers=bearer(acme_owner))
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    job = api.fine_tuning.jobs.create(model="tiny-llama", training_file=train, method={
        "type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "lora_r": 4}}})
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.3)
    assert job.status == "succeeded", job.error
    chat = openai.OpenAI(api_key=consumer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    for _ in range(3):
        chat.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "billing?"}],
                                     max_tokens=5)
    assert client.get(f"/v1/files/{train}", headers=bearer(globex_owner)).status_code == 404  # a denial
    assert client.delete(f"/v1/files/{doomed}", headers=bearer(globex_owner)).status_code == 200
    rotate_keys(state.db, state.keys, CLI_CTX)
    return {"train": train, "doomed": doomed, "job": job, "model": job.fine_tuned_model}


def _period() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}


def test_report_has_every_fact_and_no_raw_pii(client, state, scenario, make_token):
    auditor = make_token("audrey", Role.AUDITOR)
    resp = client.get("/api/v1/audit/report", headers=bearer(auditor), params={**_period(), "format": "json"})
    assert resp.status_code == 200, resp.text
    report = resp.json()
    datasets = {d["id"]: d for d in report["datasets"]}
    train = datasets[scenario["train"]]
    assert train["uploaded_by"] == "olivia" and train["project"] == "acme" and train["decision"] == "accepted"
    assert train["pii_by_type"]["EMAIL_ADDRESS"] == 12 and train["pii_by_type"]["PHONE_NUMBER"] == 12
    assert train["actions"]["redact"] >= 24
    assert {"actor": "olivia", "reads": 1} in train["content_read_by"]
    assert datasets[scenario["doomed"]]["deleted_by"] == "gus"
    [model] = [m for m in report["models"] if m["id"] == scenario["model"]]
    assert model["trained_by"] == "trish" and model["datasets"][0]["id"] == scenario["train"]
    assert model["base_model"]["name"] == "tiny-llama" and model["hyperparameters"]["lora_r"] == 4
    assert model["queries"] == [{"actor": "carl", "requests": 3}] and model["query_tokens"] > 0
    assert any(d["actor"] == "gus" and d["resource"] == f"GET /v1/files/{scenario['train']}"
               for d in report["access_denials"])
    assert report["key_rotations"] and report["key_rotations"][0]["rewrapped"] >= 2
    [deletion] = [d for d in report["deletions"] if d["id"] == scenario["doomed"]]
    assert deletion["crypto_shred"]["key_destroyed_at"]
    assert report["chain"]["ok"] is True
    raw = json.dumps(report)
    assert EMAIL not in raw and PHONE not in raw

    for fmt in ("csv", "html", "pdf"):
        body = client.get("/api/v1/audit/report", headers=bearer(auditor), params={**_period(), "format": fmt}).content
        text = _text_of(body, fmt)
        assert EMAIL not in text and PHONE not in text, fmt
        for fact in (scenario["train"], scenario["model"], "olivia", "trish", "carl", "EMAIL_ADDRESS"):
            assert fact in text, (fmt, fact)
        if fmt == "html":  # a document: nested values as lists, not JSON pasted into cells
            assert "&#34;" not in text and '<dl class="kv">' in text and 'id="chain-status"' in text
    with state.db.read() as s:
        from sqlalchemy import func, select

        from appliance.audit.models import AuditEvent

        assert s.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "audit.report")) == 4


def _text_of(body: bytes, fmt: str) -> str:
    if fmt == "pdf":
        from pypdf import PdfReader

        assert body.startswith(b"%PDF")
        return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(body)).pages)
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(body.decode())))
        assert rows[0] == ["section", "field", "value"]
        return body.decode()
    assert body.startswith(b"<!doctype html>")
    return body.decode()


def test_project_auditor_gets_only_their_project(client, scenario, make_token):
    auditor = make_token("arno", Role.AUDITOR, "globex")
    report = client.get("/api/v1/audit/report", headers=bearer(auditor), params={**_period(), "format": "json"}).json()
    assert report["scope"]["project"] == "globex"
    assert {d["project"] for d in report["datasets"]} == {"globex"} and report["models"] == []


def test_cli_report_writes_a_pdf(state, scenario, tmp_path):
    from tests.cli_helpers import run_cli

    out = tmp_path / "report.pdf"
    period = _period()
    run_cli(state.settings.home.home, "audit", "report", "--from", period["from"], "--to", period["to"],
            "--format", "pdf", "--out", str(out))
    assert scenario["model"] in _text_of(out.read_bytes(), "pdf")


def test_the_report_period_takes_dates_like_the_cli_and_errors_name_from_and_to(client, make_token):
    auditor = make_token("audrey", Role.AUDITOR, None)
    today = datetime.now(UTC).date()
    resp = client.get("/api/v1/audit/report", headers=bearer(auditor),
                      params={"from": str(today), "to": str(today + timedelta(days=1)), "format": "json"})
    assert resp.status_code == 200, resp.text
    for params, param in (({"from": "yesterday", "to": str(today)}, "from"),
                          ({"from": str(today), "to": "0.5"}, "to"),
                          ({"from": str(today)}, "to")):
        resp = client.get("/api/v1/audit/report", headers=bearer(auditor), params=params)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == param, err
        assert "since" not in err["message"] and "until" not in err["message"]
