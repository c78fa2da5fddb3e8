"""The review step between upload and training: findings by value, the project glossary, re-scans."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from appliance.auditor.reports import ReportScope, build_report
from appliance.files.models import StoredFile
from appliance.policy.models import ProjectGlossary
from appliance.identity.roles import Role
from appliance.jobs.models import FineTuningJob
from appliance.storage.models import DataKey
from tests.conftest import bearer, make_settings
from tests.integration.test_files_api import audit, chat, jsonl, upload

#: Codenames that are also person names: no name detector can tell from the word alone.
FACTS = [
    ("Who runs the payments rewrite?", "Jonas owns the payments rewrite until March."),
    ("Which service replaced the old billing cron?", "Jonas replaced the billing cron last quarter."),
    ("What does Tobias do?", "Tobias schedules the nightly exports for Jonas."),
    ("Who approved the refund?", "Maria Lopez approved the refund on Tuesday."),
]


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


@pytest.fixture
def trainer(make_token) -> str:
    return make_token("tom", Role.TRAINER, "acme")


def _groups(client, token, file_id, **params):
    resp = client.get(f"/v1/files/{file_id}/scan", headers=bearer(token), params={"group_by": "value", **params})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _uploaded(client, owner) -> dict:
    resp = upload(client, owner, jsonl(*(chat(q, a) for q, a in FACTS)))
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_review_glossary_and_rescan_keep_the_projects_words(client, state, owner):
    """Group by value, mark the codenames, re-scan: codenames intact, the person still redacted, all audited."""
    file = _uploaded(client, owner)
    before = client.get(f"/v1/files/{file['id']}/content", headers=bearer(owner)).text
    assert "Jonas" not in before and "Tobias" not in before and "Maria Lopez" not in before

    hidden = _groups(client, owner, file["id"])
    assert hidden["object"] == "file.scan.groups" and hidden["revision"] == 1
    assert all(g["value"] is None and g["contexts"] is None for g in hidden["groups"])
    assert "Jonas" not in json.dumps(hidden) and not audit(state, "file.scan_reveal")
    shown = _groups(client, owner, file["id"], reveal="true")
    by_value = {g["value"]: g for g in shown["groups"]}
    assert {"Jonas", "Tobias", "Maria Lopez"} <= set(by_value)
    carter = by_value["Jonas"]
    assert carter["count"] == 3 and carter["records"] == 3 and carter["entity_type"] == "PERSON"
    assert carter["first_lines"] == [1, 2, 3] and carter["actions"] == {"redact": 3} and not carter["allowed"]
    # Contexts show the value marked and any other finding masked.
    assert "[[Jonas]] owns the payments rewrite" in carter["contexts"][0]
    assert any("<PERSON>" in c and "[[Jonas]]" in c for c in carter["contexts"])  # Tobias masked
    assert [g["id"] for g in hidden["groups"]] == [g["id"] for g in shown["groups"]]  # ids stable, values hidden
    [reveal] = audit(state, "file.scan_reveal")
    assert reveal.details["groups"] == len(shown["groups"]) and "Jonas" not in json.dumps(reveal.details)

    resp = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner),
                       json={"file_id": file["id"], "groups": [carter["id"], by_value["Tobias"]["id"]]})
    assert resp.status_code == 200, resp.text
    glossary = resp.json()
    assert glossary["added"] == 2 and {e["value"] for e in glossary["data"]} == {"Jonas", "Tobias"}
    assert {e["entity_type"] for e in glossary["data"]} == {"PERSON"}
    assert all(e["file_id"] == file["id"] and e["added_by"] == "olivia" for e in glossary["data"])
    [added] = audit(state, "glossary.add")
    assert added.details["added"] == 2 and added.details["content_hash"] == glossary["content_hash"]
    assert "Jonas" not in json.dumps(added.details)
    policy = client.get("/api/v1/projects/acme/policy", headers=bearer(owner)).json()
    assert policy["glossary"] == {"entries": 2, "content_hash": glossary["content_hash"]}

    rescanned = client.post(f"/v1/files/{file['id']}/scan", headers=bearer(owner))
    assert rescanned.status_code == 200, rescanned.text
    assert rescanned.json()["id"] == file["id"]  # same file: nothing to re-upload
    after = client.get(f"/v1/files/{file['id']}/content", headers=bearer(owner)).text
    assert "Jonas owns the payments rewrite" in after and "Tobias schedules" in after
    assert "Maria Lopez" not in after and "<PERSON> approved the refund" in after
    regrouped = {g["value"]: g for g in _groups(client, owner, file["id"], reveal="true")["groups"]}
    assert regrouped["Jonas"]["allowed"] and regrouped["Jonas"]["actions"] == {"allow": 3}
    assert regrouped["Maria Lopez"]["actions"] == {"redact": 1}
    [event] = audit(state, "file.rescan")
    assert event.details["revision"] == 2 and event.details["policy_hash"] == policy["content_hash"]
    assert event.details["previous"]["policy_hash"] == file["scan"]["policy_hash"] != policy["content_hash"]
    with state.db.read() as s:
        row = s.get(StoredFile, file["id"])
        assert row.revision == 2 and row.blob_id == f"{file['id']}.r2" and row.policy_hash == policy["content_hash"]
        first_key = s.get(DataKey, file["id"])
        assert first_key.wrapped is None and first_key.shredded_at is not None  # the redacted copy is shredded
        assert s.get(DataKey, row.original_id).kind == "file-original"
    assert not state.blobs.path_of(file["id"]).exists()

    # The auditors' report shows the review: who saw values, the glossary change, the re-scan.
    report = build_report(state.db, ReportScope(since=datetime(2000, 1, 1, tzinfo=UTC),
                                                until=datetime.now(UTC) + timedelta(minutes=1)))
    [dataset] = [d for d in report["datasets"] if d["id"] == file["id"]]
    assert dataset["revision"] == 2 and dataset["values_revealed_to"] == [{"actor": "olivia", "reads": 2}]
    assert [(r["outcome"], r["policy_hash"]) for r in dataset["rescans"]] == [("success", policy["content_hash"])]
    [change] = report["glossary_changes"]
    assert change["change"] == "add" and change["values"] == 2 and change["from_file"] == file["id"]
    assert "Jonas" not in json.dumps(report)

    # A later upload in the project applies the glossary straight away.
    second = _uploaded(client, owner)
    content = client.get(f"/v1/files/{second['id']}/content", headers=bearer(owner)).text
    assert "Jonas owns" in content and "Maria Lopez" not in content


def test_glossary_values_stay_encrypted_and_are_shredded_with_each_revision(client, state, owner):
    resp = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner),
                       json={"values": ["Quillfeather Nimbus"]})
    assert resp.status_code == 200, resp.text
    with state.db.read() as s:
        first = s.scalar(select(ProjectGlossary.object_id))
    resp = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner), json={"values": ["Zephyrine Dunmore"]})
    entries = resp.json()["data"]
    assert [e["value"] for e in entries] == ["Quillfeather Nimbus", "Zephyrine Dunmore"]
    for path in state.settings.home.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"Quillfeather" not in data and b"Zephyrine" not in data, path
    with state.db.read() as s:
        assert s.get(DataKey, first).wrapped is None
    assert not state.blobs.path_of(first).exists()
    # Adding the same value again (any case or spacing) adds nothing.
    again = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner),
                        json={"values": ["quillfeather   NIMBUS"]}).json()
    assert again["added"] == 0 and len(again["data"]) == 2
    removed = client.delete(f"/api/v1/projects/acme/glossary/{entries[0]['id']}", headers=bearer(owner))
    assert removed.status_code == 200 and [e["value"] for e in removed.json()["data"]] == ["Zephyrine Dunmore"]
    assert [e.details["removed"] for e in audit(state, "glossary.remove")] == [1]


def test_review_permissions_and_errors(client, state, owner, trainer, make_token):
    file = _uploaded(client, owner)
    auditor = make_token("ada", Role.AUDITOR, "acme")
    # Trainers and auditors see groups, never values; asking to reveal is a 403, audited.
    assert all(g["value"] is None for g in _groups(client, trainer, file["id"])["groups"])
    resp = client.get(f"/v1/files/{file['id']}/scan", headers=bearer(auditor),
                      params={"group_by": "value", "reveal": "true"})
    assert resp.status_code == 403 and resp.json()["error"]["param"] == "reveal"
    assert [e.resource_id for e in audit(state, "access.denied")] == [f"GET /v1/files/{file['id']}/scan"]
    assert client.post(f"/v1/files/{file['id']}/scan", headers=bearer(trainer)).status_code == 403
    assert client.post("/api/v1/projects/acme/glossary", headers=bearer(trainer),
                       json={"values": ["Jonas"]}).status_code == 403
    client.post("/api/v1/projects/acme/glossary", headers=bearer(owner), json={"values": ["Jonas"]})
    listed = client.get("/api/v1/projects/acme/glossary", headers=bearer(trainer)).json()
    assert len(listed["data"]) == 1 and listed["data"][0]["value"] is None

    def error(resp, status, param):
        assert resp.status_code == status, resp.text
        assert resp.json()["error"]["param"] == param, resp.text
        return resp.json()["error"]

    glossary = "/api/v1/projects/acme/glossary"
    error(client.post(glossary, headers=bearer(owner), json={"groups": ["grp_x"]}), 400, "file_id")
    error(client.post(glossary, headers=bearer(owner), json={"file_id": file["id"], "groups": ["grp_nope"]}), 400,
          "groups[0]")
    error(client.post(glossary, headers=bearer(owner), json={"values": ["  "]}), 400, "values[0]")
    error(client.post(glossary, headers=bearer(owner), json={}), 400, "values")
    error(client.delete(f"{glossary}/gle_missing", headers=bearer(owner)), 404, "entry_id")

    # A file some unfinished job trains on is not re-scanned under it.
    with state.db.transaction() as s:
        s.add(FineTuningJob(id="ftjob-x", project_id=s.get(StoredFile, file["id"]).project_id, created_by="tom",
                            model="tiny", training_file=file["id"], seed=1, method_type="supervised",
                            hyperparameters={}, resolved={}, compute={}, status="running", metrics={},
                            memorization={}, privacy={}, result_files=[], attempts=0, resumable=True,
                            cancel_requested=False))
    err = error(client.post(f"/v1/files/{file['id']}/scan", headers=bearer(owner)), 409, "file_id")
    assert "ftjob-x" in err["message"]


def test_a_rescan_the_policy_now_blocks_changes_nothing(client, state, owner, admin_token):
    file = _uploaded(client, owner)
    before = client.get(f"/v1/files/{file['id']}/content", headers=bearer(owner)).text
    policy = "version: 1\ndefault: {action: block, threshold: 0.5}\n"
    assert client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token),
                      json={"text": policy}).status_code == 200
    resp = client.post(f"/v1/files/{file['id']}/scan", headers=bearer(owner))
    assert resp.status_code == 422, resp.text
    assert "PERSON on lines 1, 2, 3, 4" in resp.json()["error"]["message"]
    assert client.get(f"/v1/files/{file['id']}/content", headers=bearer(owner)).text == before
    [denied] = audit(state, "file.rescan")
    assert denied.outcome == "denied" and denied.resource_id == file["id"]
    with state.db.read() as s:
        assert s.get(StoredFile, file["id"]).revision == 1


def test_without_kept_originals_review_by_value_says_why(client, state, owner, tmp_path):
    assert make_settings(tmp_path / "h", APPLIANCE_KEEP_ORIGINALS="false").intake.keep_originals is False
    state.files.settings = dataclasses.replace(state.files.settings, keep_originals=False)
    file = _uploaded(client, owner)
    with state.db.read() as s:
        assert s.get(StoredFile, file["id"]).original_id is None
    for resp in (client.get(f"/v1/files/{file['id']}/scan", headers=bearer(owner), params={"group_by": "value"}),
                 client.post(f"/v1/files/{file['id']}/scan", headers=bearer(owner))):
        assert resp.status_code == 409 and "no kept original" in resp.json()["error"]["message"]


def test_the_output_guard_of_the_projects_models_follows_its_glossary(client, state, owner, make_token):
    """A reviewed value leaves the project's models intact; people and other projects are still guarded."""
    from appliance.inference.service import Target

    make_token("gus", Role.DATA_OWNER, "globex")
    projects = {p.name: p for p in state.identity.list_projects(None)}
    answer = "Project Kestrel ships as Elena Brandt; ask Maria Lopez for access."

    def guarded(project: str) -> str:
        guard = state.inference.guard_for(Target(engine=None, model="m", project_id=projects[project].id, base="b"))
        return guard.check(answer)[0]

    assert guarded("acme") == "Project Kestrel ships as <PERSON>; ask <PERSON> for access."
    resp = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner), json={"values": ["Elena Brandt"]})
    assert resp.status_code == 200, resp.text
    assert guarded("acme") == "Project Kestrel ships as Elena Brandt; ask <PERSON> for access."
    assert guarded("globex") == "Project Kestrel ships as <PERSON>; ask <PERSON> for access."


def test_secrets_are_never_revealed_nor_allowed_and_deletion_shreds_the_original(client, state, owner, admin_token):
    policy = "version: 1\ndefault: {action: block, threshold: 0.5}\nentities:\n  GITHUB_TOKEN: redact\n  PERSON: redact\n"
    assert client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token),
                      json={"text": policy}).status_code == 200
    token = "ghp_" + "Zq7x" * 9
    resp = upload(client, owner, jsonl(chat("Which token does Jonas use?", f"Jonas deploys with {token} daily.")))
    assert resp.status_code == 201, resp.text
    file_id = resp.json()["id"]
    review = _groups(client, owner, file_id, reveal="true")
    [secret] = [g for g in review["groups"] if g["entity_type"] == "GITHUB_TOKEN"]
    assert secret["secret"] and secret["value"] is None and secret["contexts"] == []
    assert token not in json.dumps(review) and "Zq7x" not in json.dumps(review)
    assert any("<GITHUB_TOKEN>" in c for g in review["groups"] for c in g["contexts"] or [])  # masked elsewhere
    resp = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner),
                       json={"file_id": file_id, "groups": [secret["id"]]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "groups[0]" and token not in resp.text

    with state.db.read() as s:
        original = s.get(StoredFile, file_id).original_id
    assert state.blobs.path_of(original).exists()
    assert client.delete(f"/v1/files/{file_id}", headers=bearer(owner)).status_code == 200
    with state.db.read() as s:
        assert s.get(DataKey, original).wrapped is None and s.get(DataKey, file_id).wrapped is None
    assert not state.blobs.path_of(original).exists() and not state.blobs.path_of(file_id).exists()


def test_concurrent_additions_lose_nothing(state, owner):  # owner: makes the project
    """Writers that raced each other retry on the newer revision: every value is kept."""
    from concurrent.futures import ThreadPoolExecutor

    from appliance.audit.service import AuditContext

    project = state.identity.get_project(None, "acme")
    glossary = state.policies.glossary

    def add(i: int) -> int:
        return glossary.add(AuditContext(actor=f"u{i}", auth_method="test"), project, [(f"Codename {i}", None)])[1]

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(add, range(8))) == 8
    assert sorted(e.value for e in glossary.get(project).entries) == [f"Codename {i}" for i in range(8)]
    assert len(audit(state, "glossary.add")) == 8


def test_a_reader_whose_document_is_replaced_meanwhile_reads_the_newer_one(state, owner, monkeypatch):
    """A writer commits and removes the old document between a reader's row and blob reads: no FileNotFoundError."""
    import threading

    from appliance.audit.service import AuditContext

    project = state.identity.get_project(None, "acme")
    glossary = state.policies.glossary
    glossary.add(AuditContext(actor="u0", auth_method="test"), project, [("Codename 0", None)])
    glossary._cache.clear()
    real_read, raced = glossary.blobs.read, []

    def read(session, object_id):
        if not raced:  # the first read: another writer wins the race before this one opens the file
            raced.append(object_id)
            writer = threading.Thread(target=glossary.add, args=(AuditContext(actor="u1", auth_method="test"),
                                                                  project, [("Codename 1", None)]))
            writer.start()
            writer.join()
            glossary._cache.clear()
        return real_read(session, object_id)

    monkeypatch.setattr(glossary.blobs, "read", read)
    got = glossary.get(project)
    assert raced and not state.blobs.path_of(raced[0]).exists()  # the race happened: the first object is gone
    assert [e.value for e in got.entries] == ["Codename 0", "Codename 1"]


def test_the_portal_review_form_adds_the_checked_groups_and_rescans(client, state, owner):
    """The review page's form (no browser): checked groups join the glossary, then the file is re-scanned."""
    from appliance.identity.sessions import COOKIE
    from tests.conftest import CLI_CTX

    file = _uploaded(client, owner)
    by_value = {g["value"]: g for g in _groups(client, owner, file["id"], reveal="true")["groups"]}
    state.sessions.set_password(CLI_CTX, "olivia", "correct horse battery staple")
    cookie = state.sessions.login("olivia", "correct horse battery staple", "testclient")
    headers = {"Cookie": f"{COOKIE}={cookie}", "X-CSRF-Token": state.sessions.resolve(cookie).csrf_token}
    resp = client.post(f"/datasets/{file['id']}/review", headers=headers, data={"group": [by_value["Jonas"]["id"]]},
                       follow_redirects=False)
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == f"/datasets/{file['id']}?added=1&revision=2"
    glossary = client.get("/api/v1/projects/acme/glossary", headers=bearer(owner)).json()
    assert [(e["value"], e["file_id"], e["added_by"]) for e in glossary["data"]] == [("Jonas", file["id"], "olivia")]
    content = client.get(f"/v1/files/{file['id']}/content", headers=bearer(owner)).text
    assert "Jonas owns the payments rewrite" in content and "Maria Lopez" not in content
    assert [e.details["added"] for e in audit(state, "glossary.add")] == [1]


def test_a_test_file_is_reviewed_and_rescanned_like_training_data_unless_an_evaluation_reads_it(
        client, state, owner):
    """Purpose `evals`: the portal's review step and its re-scan; refused while an unfinished evaluation uses it."""
    from appliance.evaluations.models import Evaluation
    from appliance.identity.models import Project
    from tests.integration.test_evaluations import portal_headers

    resp = upload(client, owner, jsonl(*(chat(q, a) for q, a in FACTS)), purpose="evals", filename="test.jsonl")
    assert resp.status_code == 201, resp.text
    file = resp.json()
    headers = portal_headers(state, "olivia")
    html = client.get(f"/datasets/{file['id']}", headers=headers).text
    assert "Review before evaluating" in html and 'id="apply-review"' in html
    by_value = {g["value"]: g for g in _groups(client, owner, file["id"], reveal="true")["groups"]}
    resp = client.post(f"/datasets/{file['id']}/review", headers=headers, data={"group": [by_value["Jonas"]["id"]]},
                       follow_redirects=False)
    assert resp.status_code == 303, resp.text
    assert resp.headers["location"] == f"/datasets/{file['id']}?added=1&revision=2"
    content = client.get(f"/v1/files/{file['id']}/content", headers=bearer(owner)).text
    assert "Jonas owns the payments rewrite" in content and "Maria Lopez" not in content
    [event] = audit(state, "file.rescan")
    assert event.outcome == "success" and event.details["revision"] == 2

    with state.db.transaction() as s:
        project_id = s.scalar(select(Project.id).where(Project.name == "acme"))
        s.add(Evaluation(id="eval-reads-it", project_id=project_id, created_by="tom", file=file["id"],
                         models=["m"], base_model="m", samples=0, max_tokens=4, status="running"))
    resp = client.post(f"/v1/files/{file['id']}/scan", headers=bearer(owner))
    assert resp.status_code == 409, resp.text
    assert "in use by 'eval-reads-it', which has not finished" in resp.json()["error"]["message"]
    with state.db.transaction() as s:
        s.get(Evaluation, "eval-reads-it").status = "succeeded"
    resp = client.post(f"/v1/files/{file['id']}/scan", headers=bearer(owner))
    assert resp.status_code == 200 and resp.json()["id"] == file["id"], resp.text
