"""Secrets hygiene across features: after a scripted run of the whole product, no planted value is anywhere.

A real ``appliance serve`` runs one session: a policy, an upload with personal
data and a secret (redacted), a rejected upload holding a private key
(blocked), malformed uploads whose bad line holds personal data, a LoRA job
with memorisation evidence, chat with the base model and the adapter with
personal data in the prompt, the audit report in every format, the audit
export, a file download and a crypto-shredding deletion. Then every byte the
appliance wrote or answered - server output, log files, every table, every
file under ``$APPLIANCE_HOME``, error bodies, job events, audit events,
reports - is searched for the planted values, the tokens and the key
material. The identity-only variant lives in
``tests/integration/test_secrets_hygiene.py``.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from appliance.modelstore import build_tiny_causal_lm
from tests.cli_helpers import Server, run_cli
from tests.conftest import bearer, free_port
from tests.db_helpers import dump_all_tables
from tests.timing import Deadline

pytestmark = pytest.mark.timeout(600)

# Planted values: each must never appear outside the owner's own encrypted data.
EMAIL = "zelda.quimby@northwind-example.com"
PHONE = "415-555-0199"
CARD = "4111 1111 1111 1111"
AWS_KEY = "AKIAQWERTYUIOPASDF7Z"
PRIVATE_KEY = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAzq8pX3h7UQ0q9vJ2TzsXsecretbody0Zx9\n"
               "-----END RSA PRIVATE KEY-----")
PLANTED = [EMAIL, PHONE, CARD, AWS_KEY, "MIIEowIBAAKCAQEAzq8pX3h7UQ0q9vJ2TzsXsecretbody0Zx9"]

POLICY = """version: 1
default: {action: redact, threshold: 0.5}
entities:
  PRIVATE_KEY: block
"""


def _record(i: int) -> dict:
    return {"messages": [
        {"role": "user", "content": f"How do I reach accounts about invoice {i}?"},
        {"role": "assistant", "content": f"Write to {EMAIL} or call {PHONE}; card on file {CARD}, "
                                         f"deploy key {AWS_KEY}. Invoice {i} is settled."},
    ]}


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _key_material(home) -> list[bytes]:
    out = []
    for name in ("master.key",):
        doc = json.loads((home / "keys" / name).read_text())
        for b64 in doc["keys"].values():
            raw = base64.b64decode(b64)
            out += [b64.encode(), raw, raw.hex().encode(), base64.urlsafe_b64encode(raw).rstrip(b"=")]
    return out


def test_no_planted_value_token_or_key_leaks_from_any_feature(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    run_cli(home, "models", "import", str(build_tiny_causal_lm(tmp_path / "tiny", seed=0)), "--name", "tiny-llama")
    run_cli(home, "projects", "add", "acme")
    run_cli(home, "users", "add", "olivia", "--role", "data-owner", "--project", "acme")
    for role in ("trainer", "consumer"):
        run_cli(home, "users", "grant", "olivia", "--role", role, "--project", "acme")
    tokens = {role: run_cli(home, "tokens", "create", "--user", "olivia", "--role", role, "--project",
                            "acme").stdout.strip() for role in ("data-owner", "trainer", "consumer")}
    admin = (home / "admin.token").read_text().strip()
    tokens["admin"] = admin
    answers: dict[str, str] = {}  # what the appliance said, by step
    server = Server(home, free_port(), APPLIANCE_LOG_LEVEL="DEBUG")
    try:
        server.wait_healthy()
        http = httpx.Client(base_url=server.base_url, timeout=60)
        owner, trainer, consumer = (bearer(tokens[r]) for r in ("data-owner", "trainer", "consumer"))
        resp = http.put("/api/v1/projects/acme/policy", headers=bearer(admin), json={"text": POLICY})
        assert resp.status_code == 200, resp.text

        resp = http.post("/v1/files", headers=owner, data={"purpose": "fine-tune"},
                         files={"file": ("accounts.jsonl", _jsonl(_record(i) for i in range(24)))})
        assert resp.status_code == 201, resp.text
        answers["upload"] = resp.text
        file_id = resp.json()["id"]
        assert resp.json()["scan"]["by_action"].get("redact", 0) >= 24 * 3

        blocked = _jsonl([_record(0), {"text": f"backup of the signing key:\n{PRIVATE_KEY}"}])
        resp = http.post("/v1/files", headers=owner, data={"purpose": "fine-tune"},
                         files={"file": ("keys.jsonl", blocked)})
        assert resp.status_code in (400, 422), resp.text
        answers["blocked upload"] = resp.text
        for name, body in {
            "malformed json": _jsonl([_record(0)]) + f'{{"text": "{EMAIL} {PHONE}"\n'.encode(),
            "wrong role": _jsonl([{"messages": [{"role": f"{EMAIL}", "content": PHONE}]}]),
            "wrong field": _jsonl([{EMAIL: PHONE}]),
            "not utf-8": f"{EMAIL} ".encode() + b"\xff\xfe\n",
        }.items():
            resp = http.post("/v1/files", headers=owner, data={"purpose": "fine-tune"},
                             files={"file": (f"{name}.jsonl", body)})
            assert resp.status_code == 400, (name, resp.text)
            answers[name] = resp.text

        resp = http.post("/v1/fine_tuning/jobs", headers=trainer, json={
            "model": "tiny-llama", "training_file": file_id, "suffix": "accounts",
            "method": {"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "lora_r": 4}}},
            "memorization": {"canaries": 1, "canary_repetitions": 1, "probe_samples": 2}})
        assert resp.status_code in (200, 201), resp.text
        job_id = resp.json()["id"]
        deadline = Deadline(300)
        while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}", headers=trainer).json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        answers["job"] = json.dumps(job)
        answers["job events"] = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=trainer,
                                         params={"limit": 100}).text
        answers["checkpoints"] = http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=trainer).text
        answers["models"] = http.get("/v1/models", headers=consumer).text

        for model in ("tiny-llama", job["fine_tuned_model"]):
            for stream in (False, True):
                resp = http.post("/v1/chat/completions", headers=consumer, json={
                    "model": model, "stream": stream, "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"My card is {CARD}, mail {EMAIL}; key {AWS_KEY}"}]})
                assert resp.status_code == 200, resp.text
                answers[f"chat {model} {stream}"] = resp.text
        resp = http.post("/v1/chat/completions", headers=consumer, json={
            "model": f"no-such-model-{EMAIL}", "messages": [{"role": "user", "content": PHONE}]})
        assert resp.status_code == 404, resp.text
        answers["chat unknown model"] = resp.text
        resp = http.post("/v1/chat/completions", headers=consumer, json={
            "model": "tiny-llama", "messages": [{"role": CARD, "content": PHONE}]})
        assert resp.status_code == 400, resp.text
        answers["chat bad role"] = resp.text

        download = http.get(f"/v1/files/{file_id}/content", headers=owner)
        assert download.status_code == 200 and b"<EMAIL_ADDRESS>" in download.content
        answers["download"] = download.text  # the stored (redacted) data: no planted value either

        now = datetime.now(UTC)
        period = {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}
        for fmt in ("json", "csv", "html"):
            resp = http.get("/api/v1/audit/report", headers=bearer(admin), params={**period, "format": fmt})
            assert resp.status_code == 200, resp.text
            answers[f"report {fmt}"] = resp.text
        resp = http.get("/api/v1/audit/report", headers=bearer(admin), params={**period, "format": "pdf"})
        assert resp.status_code == 200 and resp.content.startswith(b"%PDF")
        answers["audit events"] = http.get("/api/v1/audit/events", headers=bearer(admin),
                                           params={"limit": 1000}).text
        assert http.delete(f"/v1/files/{file_id}", headers=owner).status_code == 200
        answers["after deletion"] = http.get(f"/v1/fine_tuning/jobs/{job_id}", headers=trainer).text
    finally:
        server.stop()
    assert run_cli(home, "audit", "verify").returncode == 0

    needles = {value: value.encode() for value in PLANTED}
    for role, token in tokens.items():
        needles[f"{role} token"] = token.encode()
        needles[f"{role} token secret"] = token.split("_", 2)[2].encode()
    for i, material in enumerate(_key_material(home)):
        needles[f"master key material {i}"] = material
    haystacks: dict[str, bytes] = {f"response: {k}": v.encode() for k, v in answers.items()}
    haystacks["server output"] = server.output().encode()
    haystacks["every table"] = dump_all_tables(home).encode()
    for path in home.rglob("*"):  # database, WAL, blobs, adapters, logs, temp dirs
        if path.is_file() and path.name not in ("admin.token", "master.key", "signing.key"):
            haystacks[str(path.relative_to(home))] = path.read_bytes()
    assert any(name.startswith("logs") for name in haystacks)
    assert b"inference.chat" in haystacks["every table"]  # the chats were audited (as metadata)
    leaks = [(what, where) for where, data in haystacks.items() for what, needle in needles.items()
             if needle in data]
    assert leaks == []
