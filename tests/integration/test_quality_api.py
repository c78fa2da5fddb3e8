"""The dataset quality report through the Files API: at upload beside the scan, reveal, leakage, shredding."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from appliance.files.models import StoredFile
from appliance.identity.roles import Role
from appliance.modelstore.tiny import build_tiny_tokenizer
from appliance.storage.models import DataKey
from tests.conftest import bearer
from tests.integration.test_files_api import audit, chat, jsonl

SENTENCES = [
    "Our warehouse in the north ships every order within two working days of payment.",
    "A refund is issued to the original card once the returned parcel has been inspected.",
    "Support tickets about invoices are answered by the billing team before noon each day.",
    "The mobile application stores your preferences locally and syncs them when online.",
]


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


def upload(client, token: str, data: bytes, **fields):
    return client.post("/v1/files", headers=bearer(token), data={"purpose": "fine-tune", **fields},
                       files={"file": ("train.jsonl", data, "application/jsonl")})


@pytest.fixture
def tiny_model(state, tmp_path):
    """A text base model whose tokenizer the report counts with (the catalogue's rows, as the service sees them)."""
    path = tmp_path / "tiny"
    build_tiny_tokenizer().save_pretrained(path)
    state.files.base_models = lambda: [SimpleNamespace(name="tiny-chat", kind="llm", path=str(path),
                                                       info={"context_length": 256})]
    return "tiny-chat"


def test_report_at_upload_with_tokens_duplicates_and_reveal(client, state, owner, make_token, tiny_model):
    records = [chat(f"Question {i}: {s}", "Noted.") for i, s in enumerate(SENTENCES)]
    records += [records[1], chat(f"Question 9: {SENTENCES[2]}", "Noted!"), chat("x " * 400, "long")]
    resp = upload(client, owner, jsonl(*records), max_seq_length="128")
    assert resp.status_code == 201, resp.text
    created = resp.json()
    quality = created["scan"]["quality"]
    assert quality["tokenizer"] == tiny_model and quality["length_unit"] == "tokens" and quality["tokens"] > 0
    assert quality["max_seq_length"] == 128 and quality["over_max_seq_length"] == {"count": 1, "lines": [7]}
    assert quality["exact_duplicates"]["count"] == 1 and quality["near_duplicates"]["count"] == 1
    assert "warehouse" not in json.dumps(created) and "sketch" not in quality

    file_id = created["id"]
    got = client.get(f"/v1/files/{file_id}/quality", headers=bearer(owner)).json()
    assert got["object"] == "file.quality" and got["examples"] is None and "sketch" not in got["quality"]
    assert {a["code"] for a in got["quality"]["advice"]} >= {"exact_duplicates", "near_duplicates",
                                                              "over_max_seq_length"}
    assert audit(state, "file.quality_reveal") == []

    trainer = make_token("tom", Role.TRAINER, "acme")
    assert client.get(f"/v1/files/{file_id}/quality", headers=bearer(trainer)).status_code == 200
    denied = client.get(f"/v1/files/{file_id}/quality", params={"reveal": "true"}, headers=bearer(trainer))
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "reveal"

    shown = client.get(f"/v1/files/{file_id}/quality", params={"reveal": "true"}, headers=bearer(owner)).json()
    [exact] = shown["examples"]["exact_duplicates"]
    assert exact["lines"] == [2, 5] and all(SENTENCES[1] in r[0] for r in exact["records"])
    [near] = shown["examples"]["near_duplicates"]
    assert near["lines"] == [3, 6] and SENTENCES[2] in near["records"][1][0]
    [event] = audit(state, "file.quality_reveal")
    assert event.resource_id == file_id and event.details == {"records": 4}


def test_unknown_model_and_bad_max_seq_length_are_refused_by_name(client, state, owner, tiny_model):
    bad = upload(client, owner, jsonl(chat("q", "a")), model="no-such-model")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model", bad.text
    bad = upload(client, owner, jsonl(chat("q", "a")), max_seq_length="lots")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_seq_length", bad.text


def test_without_a_base_model_the_report_counts_characters_and_says_why(client, owner):
    quality = upload(client, owner, jsonl(chat("q", "a"))).json()["scan"]["quality"]
    assert quality["tokens"] is None and quality["length_unit"] == "characters"
    assert quality["tokenizer_note"] == "no text base model is imported"
    assert quality["advice"][0]["code"] == "no_tokenizer"


def test_leakage_between_training_and_validation_files(client, owner, make_token):
    train = upload(client, owner, jsonl(*[chat(f"{i}: {s}", "ok") for i, s in enumerate(SENTENCES)])).json()["id"]
    valid = upload(client, owner, jsonl(chat(f"1: {SENTENCES[1]}", "ok"), chat(f"2: {SENTENCES[2]}", "okay"),
                                        chat("Something else entirely, about the weather in the hills.", "ok")))
    valid_id = valid.json()["id"]
    got = client.get(f"/v1/files/{train}/quality", params={"compare": valid_id}, headers=bearer(owner)).json()
    leak = got["leakage"]
    assert leak["file_id"] == train and leak["compare"] == valid_id and leak["records"] == 3
    assert leak["exact"]["count"] == 1 and leak["near"]["count"] == 1 and leak["share"] == round(2 / 3, 4)
    assert "weather" not in json.dumps(got)
    other = make_token("oscar", Role.DATA_OWNER, "other")
    theirs = upload(client, other, jsonl(chat("q", "a"))).json()["id"]
    resp = client.get(f"/v1/files/{train}/quality", params={"compare": theirs}, headers=bearer(owner))
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "compare", resp.text
    resp = client.get(f"/v1/files/{train}/quality", params={"compare": "file-missing"}, headers=bearer(owner))
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "compare", resp.text


def test_the_sketch_is_encrypted_replaced_on_rescan_and_shredded_with_the_file(client, state, owner):
    file_id = upload(client, owner, jsonl(chat("Where is my parcel?", "On its way."))).json()["id"]
    with state.db.read() as s:
        sketch = s.get(StoredFile, file_id).scan_summary["quality"]["sketch"]
        assert s.get(DataKey, sketch).kind == "file-quality"
    assert b"parcel" not in state.blobs.path_of(sketch).read_bytes()
    assert client.post(f"/v1/files/{file_id}/scan", headers=bearer(owner)).status_code == 200
    with state.db.read() as s:
        renewed = s.get(StoredFile, file_id).scan_summary["quality"]["sketch"]
        assert renewed != sketch and s.get(DataKey, sketch).wrapped is None
    assert not state.blobs.path_of(sketch).exists()
    assert client.delete(f"/v1/files/{file_id}", headers=bearer(owner)).status_code == 200
    with state.db.read() as s:
        assert s.get(DataKey, renewed).wrapped is None
    assert not state.blobs.path_of(renewed).exists()


def test_the_projects_policy_may_block_on_quality_and_nothing_is_kept(client, state, owner, admin_token):
    from tests.integration.test_files_api import stored_count

    current = client.get("/api/v1/projects/acme/policy", headers=bearer(owner)).json()["text"]
    limited = current + "\nquality:\n  block_over:\n    exact_duplicates: 0.2\n"
    assert client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token),
                      json={"text": limited}).status_code == 200
    record = chat("Where is my parcel?", "On its way.")
    refused = upload(client, owner, jsonl(record, record, record, chat("Anything else?", "No.")))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert "exact_duplicates in 2 of 4 records (50.0%, over the limit of 20%)" in error["message"]
    assert error["param"] == "file" and stored_count(state) == 0
    [event] = audit(state, "file.reject")
    assert event.details["quality_blocked"]["exact_duplicates"]["count"] == 2 and "parcel" not in json.dumps(
        event.details)
    assert upload(client, owner, jsonl(record, chat("Anything else?", "No."))).status_code == 201


def test_a_job_whose_validation_file_leaks_into_its_training_file_says_so(client, state, owner, make_token, tmp_path):
    from appliance.modelstore import build_tiny_causal_lm
    from tests.conftest import CLI_CTX

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(tmp_path / "tiny-src", seed=0), "tiny-llama")
    train = upload(client, owner, jsonl(*[chat(f"{i}: {s}", "ok") for i, s in enumerate(SENTENCES)])).json()["id"]
    valid = upload(client, owner, jsonl(chat(f"1: {SENTENCES[1]}", "ok"),
                                        chat("Something else entirely, about the weather in the hills.", "ok")))
    trainer = make_token("tom", Role.TRAINER, "acme")
    job = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                      json={"model": "tiny-llama", "training_file": train, "validation_file": valid.json()["id"]})
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=bearer(trainer)).json()["data"]
    [leak] = [e for e in events if e["message"].startswith("Leakage:")]
    assert leak["level"] == "warn" and "1 of 2 evaluation records" in leak["message"]
    assert leak["data"]["leakage"]["exact"]["count"] == 1 and "weather" not in json.dumps(events)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=bearer(trainer))
