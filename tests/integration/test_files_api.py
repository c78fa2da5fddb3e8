"""The Files API end to end: official openai client, validation, policy, encryption at rest."""

from __future__ import annotations

import io
import json
import secrets
import tempfile

import openai
import pytest
from sqlalchemy import func, select

from appliance.audit.models import AuditEvent
from appliance.files.models import StoredFile
from appliance.identity.roles import Role
from appliance.storage.models import DataKey
from tests.conftest import bearer


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def openai_client(client, token: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0, **kw)


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


def upload(client, token: str, data: bytes, *, purpose: str = "fine-tune", filename: str = "train.jsonl", **kw):
    return client.post("/v1/files", headers=bearer(token), data={"purpose": purpose},
                       files={"file": (filename, data, "application/jsonl")}, **kw)


def audit(state, action: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def stored_count(state) -> int:
    with state.db.read() as s:
        return s.scalar(select(func.count()).select_from(StoredFile))


def test_openai_client_round_trip(client, owner):
    api = openai_client(client, owner)
    data = jsonl(chat("What is the boiling point of water at sea level?", "100 degrees Celsius."), chat("2+2?", "4"))
    created = api.files.create(file=("qa.jsonl", data), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file" and created.purpose == "fine-tune"
    assert created.filename == "qa.jsonl" and created.status == "processed" and created.bytes > 0
    assert created.model_extra["scan"]["decision"] == "accepted"
    assert [f.id for f in api.files.list().data] == [created.id]
    assert api.files.retrieve(created.id).bytes == created.bytes
    content = api.files.content(created.id).read()
    assert [json.loads(line) for line in content.splitlines()] == [json.loads(line) for line in data.splitlines()]
    deleted = api.files.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(created.id)
    assert api.files.list().data == []


def test_plaintext_never_touches_disk(client, state, owner, tmp_path, monkeypatch):
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    planted = [f"zqx{secrets.token_hex(8)}" for _ in range(5)]
    records = [chat(f"Internal code word {p} for the vault", f"Acknowledged {p}") for p in planted]
    big = jsonl(*records) + jsonl(*[chat(f"filler {i} " * 40, "ok") for i in range(3000)])  # several segments
    resp = upload(client, owner, big)
    assert resp.status_code == 201, resp.text
    file_id = resp.json()["id"]
    content = client.get(f"/v1/files/{file_id}/content", headers=bearer(owner)).content
    assert all(p.encode() in content for p in planted)  # stored, retrievable...
    for root in (state.settings.home.home, private_tmp):  # ...and never in plaintext on disk
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for p in planted:
                    assert p.encode() not in data, f"planted value in plaintext in {path}"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (jsonl(chat("a", "b")) + b'{"messages": [\n', "line 2", "not valid JSON"),
        (jsonl(chat("a", "b"), {"messages": [{"role": "wizard", "content": "x"}]}), "line 2: messages[0].role", "role"),
        (jsonl({"prompt": "p"}), "line 1: completion", "completion"),
        (b"", "file", "no records"),
        (b"\n\n", "file", "no records"),
        (jsonl(chat("a", "b")) + b'{"text": "caf\xe9"}\n', "line 2", "UTF-8"),
    ],
)
def test_invalid_files_are_rejected_naming_the_line_and_leave_nothing(client, state, owner, body, param, fragment):
    resp = upload(client, owner, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and fragment in err["message"]
    assert stored_count(state) == 0
    assert [p for p in state.settings.blobs_dir.rglob("*") if p.is_file()] == []
    [event] = audit(state, "file.reject")
    assert event.outcome == "failure" and event.details["param"] == param


def test_every_bad_line_is_reported_in_one_pass_and_nothing_is_kept(client, state, owner):
    """A file with several problems gets them all at once, each naming its line in plain words."""
    body = (jsonl(chat("a", "b")) + b'{"messages": [\n' + jsonl(chat("c", "d"))
            + jsonl({"messages": [{"role": "user", "content": "a question with no answer"}]})
            + jsonl({"prompt": "p", "completion": "  "}) + b'{"text": "caf\xe9"}\n'
            + jsonl({"messages": [{"role": "wizard", "content": "x"}]}))
    resp = upload(client, owner, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "line 2"
    assert err["message"].startswith("5 lines are not valid records: line 2 is not valid JSON")
    assert [e["param"] for e in err["errors"]] == ["line 2", "line 4: messages", "line 5: completion", "line 6",
                                                   "line 7: messages[0].role"]
    messages = [e["message"] for e in err["errors"]]
    assert "needs an `assistant` message" in messages[1] and "only `user` messages" in messages[1]
    assert "`completion` is empty" in messages[2] and "UTF-8" in messages[3]
    for message in messages:  # each starts with its line, once, and carries no bracketed parameter
        assert message.startswith(("line 2 ", "line 4: ", "line 5: ", "line 6 ", "line 7: ")), message
        assert "[" not in message.split(":")[0] and " at at " not in message
    assert "a question with no answer" not in resp.text  # problems are described, never quoted
    assert stored_count(state) == 0
    assert [p for p in state.settings.blobs_dir.rglob("*") if p.is_file()] == []
    [event] = audit(state, "file.reject")
    assert event.outcome == "failure" and event.details["param"] == "line 2"


def test_a_bad_line_after_many_good_ones_still_leaves_nothing(client, state, owner):
    """Records already scanned and written before the bad line are discarded with the upload."""
    body = b"".join(jsonl(chat(f"q{i}", f"a{i}")) for i in range(600)) + b'{"text": 1}\n'
    resp = upload(client, owner, body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "line 601: text"
    assert "errors" in resp.json()["error"] and len(resp.json()["error"]["errors"]) == 1
    assert stored_count(state) == 0
    assert [p for p in state.settings.blobs_dir.rglob("*") if p.is_file()] == []


def test_unknown_purpose_and_missing_parts(client, state, owner):
    resp = upload(client, owner, jsonl(chat("a", "b")), purpose="assistants")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "purpose"
    resp = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] in ("file", "Content-Type")
    assert stored_count(state) == 0


def test_over_the_size_limit_is_413_and_leaves_nothing(home, make_token):
    from litestar.testing import TestClient

    from appliance.bootstrap import open_initialized
    from appliance.server.app import create_app
    from appliance.server.state import build_state
    from tests.conftest import make_settings

    settings = make_settings(home.home.home, APPLIANCE_MAX_UPLOAD_BYTES="2000")
    state = build_state(settings, open_initialized(settings))
    with TestClient(create_app(settings, state, run_scheduler=False)) as client:
        token = _token(state, "oscar", Role.DATA_OWNER, "acme")
        resp = upload(client, token, jsonl(*[chat("x" * 50, "y" * 50) for _ in range(40)]))
        assert resp.status_code == 413 and resp.json()["error"]["param"] == "file"
        assert stored_count(state) == 0 and not any(p.is_file() for p in settings.blobs_dir.rglob("*"))
    state.db.dispose()


def _token(state, user, role, project):
    from tests.conftest import CLI_CTX

    state.identity.create_project(CLI_CTX, project)
    state.identity.create_user(CLI_CTX, user)
    state.identity.grant(CLI_CTX, user, role, project)
    return state.identity.create_token(CLI_CTX, user, role, project)[1]


def test_blocked_entities_reject_the_file_with_types_and_lines(client, state, owner):
    body = jsonl(
        chat("hello", "hi"),
        chat("deploy with AKIAIOSFODNN7EXAMPLE please", "done"),
        chat("nothing here", "fine"),
        chat("my card is 4539 1488 0343 6467, expiry 12/29", "noted"),
    )
    resp = upload(client, owner, body)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "policy_violation"
    assert "AWS_ACCESS_KEY" in err["message"] and "line 2" in err["message"]
    assert "CREDIT_CARD" in err["message"] and "line 4" in err["message"]
    assert "AKIAIOSFODNN7EXAMPLE" not in resp.text and "4539" not in resp.text
    assert err["scan"]["decision"] == "rejected"
    assert stored_count(state) == 0
    [event] = audit(state, "file.reject")
    assert event.outcome == "denied" and "AKIA" not in json.dumps(event.details)


def test_refused_uploads_are_listed_for_their_owner_with_the_reason(client, state, owner, make_token):
    """Nothing of a refused file is kept, but its owner can still see when, which file and why."""
    assert client.get("/api/v1/files/rejected", headers=bearer(owner)).json() == {"object": "list", "data": []}
    blocked = upload(client, owner, jsonl(chat("deploy with AKIAIOSFODNN7EXAMPLE please", "done")),
                     filename="keys for maria.kowalczyk@example.org.jsonl")
    assert blocked.status_code == 422
    bad = upload(client, owner, jsonl(chat("a", "b")) + b'{"text": 1}\n', filename="broken.jsonl")
    assert bad.status_code == 400
    upload(client, owner, jsonl(chat("fine", "ok")), filename="good.jsonl")  # accepted: not listed
    resp = client.get("/api/v1/files/rejected", headers=bearer(owner))
    assert resp.status_code == 200, resp.text
    newest, older = resp.json()["data"]
    assert newest["filename"] == "broken.jsonl" and newest["code"] == "invalid_request"
    assert newest["param"] == "line 2: text" and "`text` must be a string" in newest["message"]
    assert newest["project"] == "acme" and newest["purpose"] == "fine-tune" and newest["rejected_at"] > 0
    assert older["code"] == "policy_violation" and older["by_entity_type"] == {"AWS_ACCESS_KEY_ID": 1}
    assert older["blocked_lines"] == {"AWS_ACCESS_KEY_ID": [1]} and "AWS_ACCESS_KEY" in older["message"]
    # The file name is shown as it would have been stored: the email in it redacted.
    assert "maria.kowalczyk" not in resp.text and older["filename"].endswith(".jsonl")
    assert "AKIAIOSFODNN7EXAMPLE" not in resp.text
    # Another user of the same project sees only their own; a consumer may not upload, so has no list.
    other = make_token("oscar", Role.DATA_OWNER, "acme")
    assert client.get("/api/v1/files/rejected", headers=bearer(other)).json()["data"] == []
    consumer = make_token("carl", Role.CONSUMER, "acme")
    assert client.get("/api/v1/files/rejected", headers=bearer(consumer)).status_code == 403


def test_redactable_entities_are_stored_redacted_and_reported(client, state, owner):
    email = f"jane.{secrets.token_hex(4)}@example.com"
    resp = upload(client, owner, jsonl(chat("hi", "hello"), chat(f"Please email {email} about it", "Sure.")))
    assert resp.status_code == 201, resp.text
    file_id = resp.json()["id"]
    assert resp.json()["scan"]["by_action"].get("redact", 0) >= 1
    content = client.get(f"/v1/files/{file_id}/content", headers=bearer(owner)).text
    assert email not in content and "<EMAIL_ADDRESS>" in content
    report = client.get(f"/v1/files/{file_id}/scan", headers=bearer(owner)).json()
    [finding] = [f for f in report["findings"] if f["entity_type"] == "EMAIL_ADDRESS"]
    text = f"Please email {email} about it"
    assert finding["record"] == 1 and finding["field"] == "messages[0].content"
    assert text[finding["start"]:finding["end"]] == email and finding["action"] == "redact"
    assert email not in json.dumps(report)


def test_other_projects_and_roles_cannot_reach_files(client, owner, make_token):
    file_id = upload(client, owner, jsonl(chat("a", "b"))).json()["id"]
    stranger = make_token("sam", Role.DATA_OWNER, "globex")
    for method, path in [("get", f"/v1/files/{file_id}"), ("get", f"/v1/files/{file_id}/content"),
                         ("delete", f"/v1/files/{file_id}"), ("get", f"/v1/files/{file_id}/scan")]:
        assert getattr(client, method)(path, headers=bearer(stranger)).status_code == 404
    assert client.get("/v1/files", headers=bearer(stranger)).json()["data"] == []
    trainer = make_token("tina", Role.TRAINER, "acme")
    assert client.get(f"/v1/files/{file_id}", headers=bearer(trainer)).status_code == 200
    assert client.get(f"/v1/files/{file_id}/content", headers=bearer(trainer)).status_code == 403
    consumer = make_token("carl", Role.CONSUMER, "acme")
    assert upload(client, consumer, jsonl(chat("a", "b"))).status_code == 403


def test_reading_content_is_audited_and_tampering_is_an_integrity_error(client, state, owner):
    file_id = upload(client, owner, jsonl(*[chat(f"q{i}", f"a{i}") for i in range(10)])).json()["id"]
    assert client.get(f"/v1/files/{file_id}/content", headers=bearer(owner)).status_code == 200
    [event] = audit(state, "file.read_content")
    assert event.resource_id == file_id and event.actor == "olivia"
    path = state.blobs.path_of(file_id)
    blob = bytearray(path.read_bytes())
    blob[60] ^= 0x01
    path.write_bytes(bytes(blob))
    resp = client.get(f"/v1/files/{file_id}/content", headers=bearer(owner))
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "integrity_error"


def test_delete_crypto_shreds(client, state, owner):
    file_id = upload(client, owner, jsonl(chat("a", "b"))).json()["id"]
    assert client.delete(f"/v1/files/{file_id}", headers=bearer(owner)).json()["deleted"] is True
    assert not state.blobs.path_of(file_id).exists()
    with state.db.read() as s:
        key = s.get(DataKey, file_id)
        assert key.wrapped is None and key.shredded_at is not None
    [event] = audit(state, "file.delete")
    assert event.details["crypto_shred"]["kek_id"] == key.kek_id


def test_global_admin_must_name_the_project(client, admin_token, owner):
    resp = upload(client, admin_token, jsonl(chat("a", "b")))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "project"
    resp = client.post("/v1/files", headers={**bearer(admin_token), "OpenAI-Project": "acme"},
                       data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", jsonl(chat("a", "b")))})
    assert resp.status_code == 201 and resp.json()["project"] == "acme"


def test_filename_with_personal_data_is_redacted(client, owner):
    resp = upload(client, owner, jsonl(chat("a", "b")), filename="chats with john.smith@acme-corp.com.jsonl")
    assert resp.status_code == 201
    assert resp.json()["filename"] == "chats with <EMAIL_ADDRESS>.jsonl"


def test_project_policy_can_be_read_and_replaced_by_admin(client, admin_token, owner):
    h = bearer(admin_token)
    current = client.get("/api/v1/projects/acme/policy", headers=bearer(owner)).json()
    assert current["source"] == "default" and len(current["content_hash"]) == 71
    bad = client.put("/api/v1/projects/acme/policy", headers=h, json={"text": "entities:\n  EMAIL_ADDRESS:\n    action: hide\n"})
    assert bad.status_code == 400 and "hide" in bad.json()["error"]["message"]
    assert client.put("/api/v1/projects/acme/policy", headers=bearer(owner), json={"text": current["text"]}).status_code == 403
    _ = io  # keep import used for future stream tests


def test_keys_rotate_rewraps_and_the_old_key_file_opens_nothing(client, state, owner, tmp_path):
    import shutil

    from appliance.crypto.envelope import FileKeyProvider, KeyUnavailableError
    from appliance.storage.blobs import BlobStore
    from tests.cli_helpers import run_cli

    body = jsonl(chat("rotation check", "still readable"))
    file_id = upload(client, owner, body).json()["id"]
    old_key = tmp_path / "old-master.key"
    shutil.copy(state.settings.key_file, old_key)
    out = run_cli(state.settings.home.home, "keys", "rotate").stdout
    assert "3 data keys re-wrapped" in out  # the stored content, the kept original and the quality sketch
    # The running server picks up the new key file and still reads the data.
    assert client.get(f"/v1/files/{file_id}/content", headers=bearer(owner)).content == body
    # A copy of the old key file opens nothing.
    stale = BlobStore(state.settings.blobs_dir, FileKeyProvider(old_key))
    with state.db.read() as s, pytest.raises(KeyUnavailableError):
        b"".join(stale.read(s, file_id))
    with state.db.read() as s:
        original = s.get(StoredFile, file_id).original_id
        assert original and b"".join(state.blobs.read(s, original)) == body  # the original, re-wrapped too
    assert audit(state, "keys.rotate")[0].details["rewrapped"] == 3


def test_the_projects_allow_list_keeps_its_own_words_at_intake(client, state, admin_token, owner):
    """Codenames the project reviewed as no personal data reach the trainer intact; people are still redacted."""
    text = "Otto now handles refunds for the EU. Maria Lopez approved the change."
    first = upload(client, owner, jsonl(chat("Who handles EU refunds?", text))).json()
    before = client.get(f"/v1/files/{first['id']}/content", headers=bearer(owner)).text
    assert "Otto now handles" not in before and "Maria Lopez" not in before  # the scanner alone cannot tell
    policy = client.get("/api/v1/projects/acme/policy", headers=bearer(owner)).json()["text"]
    resp = client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token),
                      json={"text": policy + "\nallow_list: [Otto, Velvet Anchor]\n"})
    assert resp.status_code == 200, resp.text
    [event] = audit(state, "policy.update")
    assert event.details["policy_hash"] == resp.json()["content_hash"]
    second = upload(client, owner, jsonl(chat("Who handles EU refunds?", text)))
    assert second.status_code == 201, second.text
    content = client.get(f"/v1/files/{second.json()['id']}/content", headers=bearer(owner)).text
    assert "Otto now handles refunds" in content and "Maria Lopez" not in content
    report = client.get(f"/v1/files/{second.json()['id']}/scan", headers=bearer(owner)).json()
    actions = {(f["start"], f["action"]) for f in report["findings"] if f["field"] == "messages[1].content"}
    assert (0, "allow") in actions and (text.index("Maria"), "redact") in actions
    assert report["policy_hash"] == resp.json()["content_hash"]


PSEUDONYMIZE = """version: 1
default: {action: block, threshold: 0.5}
entities:
  PERSON: {action: pseudonymize, threshold: 0.6}
  EMAIL_ADDRESS: pseudonymize
  LOCATION: allow
"""


def test_pseudonymize_stores_consistent_surrogates_keyed_per_dataset(client, state, admin_token, owner):
    """The same person is the same stand-in throughout one dataset, another in the next; the real name is nowhere."""
    resp = client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token), json={"text": PSEUDONYMIZE})
    assert resp.status_code == 200, resp.text
    name = "Wojciech Brzęczyszczykiewicz"
    email = f"w.{secrets.token_hex(4)}@acmecorp.com"
    body = jsonl(chat(f"Please ask {name} about the invoice.", f"I spoke with {name} yesterday."),
                 chat(f"Write to {email} today.", f"Sure, {name} reads {email} daily."))

    def stored() -> tuple[str, dict]:
        up = upload(client, owner, body)
        assert up.status_code == 201, up.text
        assert up.json()["scan"]["by_action"].get("pseudonymize", 0) >= 4
        return client.get(f"/v1/files/{up.json()['id']}/content", headers=bearer(owner)).text, up.json()

    first, meta = stored()
    records = [json.loads(line) for line in first.splitlines()]
    texts = [m["content"] for r in records for m in r["messages"]]
    assert name not in first and email not in first and "<PERSON>" not in first
    fake = texts[0].removeprefix("Please ask ").removesuffix(" about the invoice.")
    assert len(fake.split()) == 2 and texts[1] == f"I spoke with {fake} yesterday."
    fake_email = texts[2].removeprefix("Write to ").removesuffix(" today.")
    assert fake_email.endswith("@example.com") and texts[3] == f"Sure, {fake} reads {fake_email} daily."
    second, _ = stored()
    assert fake not in second  # another dataset, another key: surrogates do not link datasets
    for path in state.settings.home.home.rglob("*"):
        if path.is_file():
            assert name.encode() not in path.read_bytes() and email.encode() not in path.read_bytes(), path
    report = client.get(f"/v1/files/{meta['id']}/scan", headers=bearer(owner)).json()
    assert {f["action"] for f in report["findings"]} == {"pseudonymize"} and name not in json.dumps(report)
