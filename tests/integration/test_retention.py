"""Retention: policy periods enforced by the sweeper, which crypto-shreds like a user's deletion."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from litestar.testing import TestClient
from sqlalchemy import select, update

from appliance.audit.models import AuditEvent, AuditHead
from appliance.auditor.reports import ReportScope, build_report
from appliance.audit.service import verify_chain
from appliance.bootstrap import initialize, open_initialized
from appliance.catalog.models import AdapterRecord
from appliance.db.base import Database, utcnow
from appliance.files.models import ScanFinding, StoredFile
from appliance.identity.models import Project
from appliance.identity.roles import Role
from appliance.retention import RetentionSweeper
from appliance.server.app import create_app
from appliance.server.state import AppState, build_state
from appliance.settings import Settings
from appliance.storage.models import DataKey
from tests.cli_helpers import run_cli
from tests.conftest import CLI_CTX, bearer, make_settings
from tests.integration.test_files_api import chat, jsonl, upload
from tests.timing import Deadline

BASE = "tiny-llama"
POLICY = """version: 1
default: {action: block, threshold: 0.5}
entities:
  PERSON: redact
  EMAIL_ADDRESS: redact
  LOCATION: allow
retention:
"""


@pytest.fixture
def home(tmp_path: Path) -> Settings:
    """A home whose server does not sweep by itself: the tests sweep when they choose."""
    settings = make_settings(tmp_path / "home", APPLIANCE_RETENTION_SWEEP_S="0")
    initialize(settings, CLI_CTX)
    return settings


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


@pytest.fixture
def consumer(make_token) -> str:
    return make_token("carl", Role.CONSUMER, "acme")


def set_retention(client, admin_token: str, project: str, **periods: str) -> str:
    """Give ``project`` a policy with these retention periods; returns its hash."""
    text = POLICY + "".join(f"  {k}: {v}\n" for k, v in periods.items()) if periods else POLICY.replace(
        "retention:\n", "")
    resp = client.put(f"/api/v1/projects/{project}/policy", headers=bearer(admin_token), json={"text": text})
    assert resp.status_code == 200, resp.text
    return resp.json()["content_hash"]


def age(state: AppState, model, item_id: str, days: float) -> None:
    """Move an item's creation (upload or publication) ``days`` into the past."""
    with state.db.transaction() as s:
        s.execute(update(model).where(model.id == item_id).values(created_at=utcnow() - timedelta(days=days)))


def new_file(client, token: str, text: str = "hello") -> str:
    resp = upload(client, token, jsonl(chat(f"Where is {text}?", "Ask Jane Doe at jane@example.com.")))
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def publish(state: AppState, project_name: str, tag: str, *, trained_on: list[str] = ()) -> str:
    """An adapter as a finished job publishes it, its manifest naming its training files."""
    job_id = f"ftjob-{tag}"
    adapter_id = f"ft:{BASE}:{project_name}:{tag}:{job_id}"
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == project_name))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=job_id, project=project, base_model=BASE,
                              kind="lora", files={"adapter_config.json": b"{}", "weights.bin": b"w" * 4096},
                              manifest={"job_id": job_id, "datasets": [{"id": f, "role": "train"} for f in trained_on]})
    return adapter_id


def events(state: AppState, action: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def head_seq(state: AppState) -> int:
    with state.db.read() as s:
        return s.get(AuditHead, 1).seq


def key_of(state: AppState, object_id: str) -> DataKey:
    with state.db.read() as s:
        return s.get(DataKey, object_id)


def assert_shredded(state: AppState, object_id: str) -> None:
    key = key_of(state, object_id)
    assert key.wrapped is None and key.shredded_at is not None
    assert not state.blobs.path_of(object_id).exists()


def test_expired_dataset_is_crypto_shredded_once_and_the_rest_untouched(client, state, admin_token, owner, make_token):
    old, fresh = new_file(client, owner, "the old office"), new_file(client, owner, "the new office")
    other_owner = make_token("gus", Role.DATA_OWNER, "globex")
    elsewhere = new_file(client, other_owner, "globex")  # globex keeps the default policy: forever
    for file_id in (old, elsewhere):
        age(state, StoredFile, file_id, 31)
    assert state.retention.sweep().expired == []  # no policy sets a period yet
    policy_hash = set_retention(client, admin_token, "acme", datasets="30d")

    seq = head_seq(state)
    dry = state.retention.sweep(dry_run=True)
    assert [(e.kind, e.id, e.period, e.policy_hash) for e in dry.expired] == [("dataset", old, "30d", policy_hash)]
    assert dry.dry_run and head_seq(state) == seq  # nothing changed, not even the log
    assert client.get(f"/v1/files/{old}/content", headers=bearer(owner)).status_code == 200
    assert key_of(state, old).wrapped is not None and state.blobs.path_of(old).exists()
    seq = head_seq(state)

    result = state.retention.sweep()
    assert [e.id for e in result.expired] == [old] and not result.errors and not result.skipped
    assert client.get(f"/v1/files/{old}", headers=bearer(owner)).status_code == 404
    assert client.get(f"/v1/files/{old}/content", headers=bearer(owner)).status_code == 404
    assert old not in [f["id"] for f in client.get("/v1/files", headers=bearer(owner)).json()["data"]]
    assert_shredded(state, old)
    with state.db.read() as s:
        assert s.scalars(select(ScanFinding).where(ScanFinding.file_id == old)).all() == []
    [event] = events(state, "file.delete")
    assert event.seq == seq + 1 and event.resource_id == old and event.project == "acme"
    assert event.actor == "system:retention" and event.auth_method == "internal"
    assert event.reason == "retention period of 30d expired"
    details = event.details
    assert details["reason"] == "retention" and details["policy_hash"] == policy_hash
    assert details["retention_period"] == "30d" and details["expired_at"] == result.expired[0].expired_at.isoformat()
    assert details["crypto_shred"]["kek_id"] == key_of(state, old).kek_id

    # Not yet expired, or in a project without a period: untouched and still readable.
    assert client.get(f"/v1/files/{fresh}/content", headers=bearer(owner)).status_code == 200
    assert client.get(f"/v1/files/{elsewhere}/content", headers=bearer(other_owner)).status_code == 200

    seq = head_seq(state)
    again = state.retention.sweep()
    assert again.expired == again.skipped == again.withdrawn == again.errors == []
    assert head_seq(state) == seq
    assert verify_chain(state.db).ok

    now = utcnow()
    report = build_report(state.db, ReportScope(now - timedelta(hours=1), now + timedelta(hours=1)))
    [deletion] = report["deletions"]
    assert deletion["id"] == old and deletion["actor"] == "system:retention"
    assert deletion["reason"] == f"retention (30d, policy {policy_hash})" and deletion["crypto_shred"]
    assert {d["id"]: d["deleted_by"] for d in report["datasets"]}[old] == "system:retention"


def test_the_policy_in_force_at_the_sweep_applies(client, state, admin_token, owner):
    file_id = new_file(client, owner)
    age(state, StoredFile, file_id, 10)
    set_retention(client, admin_token, "acme", datasets="30d")
    assert state.retention.sweep().expired == []
    assert state.retention.sweep(now=utcnow() + timedelta(days=19)).expired == []  # 29 days old
    set_retention(client, admin_token, "acme", datasets="7d")  # shortened: effective at the next sweep
    [expired] = state.retention.sweep().expired
    assert expired.id == file_id and expired.period == "7d"
    assert expired.expired_at == expired.created_at + timedelta(days=7)
    assert_shredded(state, file_id)


def test_hours_and_moving_the_clock_with_now(client, state, admin_token, owner):
    file_id = new_file(client, owner)
    set_retention(client, admin_token, "acme", datasets="12h")
    assert state.retention.sweep(now=utcnow() + timedelta(hours=11)).expired == []
    assert [e.id for e in state.retention.sweep(now=utcnow() + timedelta(hours=13)).expired] == [file_id]
    assert client.get(f"/v1/files/{file_id}", headers=bearer(owner)).status_code == 404


def test_expired_adapter_is_unloaded_and_shredded(client, state, admin_token, consumer):
    old, fresh = publish(state, "acme", "old"), publish(state, "acme", "fresh")
    age(state, AdapterRecord, old, 400)
    policy_hash = set_retention(client, admin_token, "acme", adapters="365d")
    removed: list[str] = []
    state.catalog.on_remove.append(removed.append)  # what serving is told, as on a user's deletion

    dry = state.retention.sweep(dry_run=True)
    assert [(e.kind, e.id) for e in dry.expired] == [("adapter", old)] and removed == []
    result = state.retention.sweep()
    assert [e.id for e in result.expired] == [old] and removed == [old]
    assert client.get(f"/v1/models/{old}", headers=bearer(consumer)).status_code == 404
    assert client.get(f"/v1/models/{fresh}", headers=bearer(consumer)).status_code == 200
    with state.db.read() as s:
        object_id = s.get(AdapterRecord, old).object_id
    assert_shredded(state, object_id)
    assert key_of(state, "adapter-fresh").wrapped is not None and state.blobs.path_of("adapter-fresh").exists()
    [event] = events(state, "adapter.delete")
    assert event.resource_id == old and event.actor == "system:retention"
    assert event.details["reason"] == "retention" and event.details["policy_hash"] == policy_hash
    assert event.details["retention_period"] == "365d"
    assert state.retention.sweep().expired == [] and verify_chain(state.db).ok


def test_adapters_trained_on_an_expired_dataset_are_withdrawn_with_it(client, state, admin_token, owner, consumer):
    data, more = new_file(client, owner, "one"), new_file(client, owner, "two")
    trained = publish(state, "acme", "trained", trained_on=[data, more])
    expiring = publish(state, "acme", "expiring", trained_on=[data])
    unrelated = publish(state, "acme", "unrelated")
    age(state, StoredFile, data, 41)
    age(state, StoredFile, more, 40)
    age(state, AdapterRecord, expiring, 40)
    set_retention(client, admin_token, "acme", datasets="30d", adapters="35d")

    expected = [("adapter", expiring), ("dataset", data), ("dataset", more)]
    dry = state.retention.sweep(dry_run=True)
    assert [(e.kind, e.id) for e in dry.expired] == expected
    assert dry.withdrawn == [(trained, data)]
    result = state.retention.sweep()
    assert [(e.kind, e.id) for e in result.expired] == expected
    assert result.withdrawn == [(trained, data)] and not result.errors
    for adapter_id in (trained, expiring):
        assert client.get(f"/v1/models/{adapter_id}", headers=bearer(consumer)).status_code == 404
    assert client.get(f"/v1/models/{unrelated}", headers=bearer(consumer)).status_code == 200
    deletes = {e.resource_id: e for e in events(state, "adapter.delete")}
    assert set(deletes) == {trained, expiring}
    assert deletes[expiring].details["reason"] == "retention"  # its own period, recorded first
    assert deletes[trained].reason == f"training data {data} was deleted"
    assert deletes[trained].actor == "system:retention"
    assert_shredded(state, data)
    assert_shredded(state, "adapter-trained")
    assert_shredded(state, "adapter-expiring")
    assert verify_chain(state.db).ok


def test_the_default_policy_can_set_a_site_wide_period(tmp_path):
    policy = tmp_path / "site.yaml"
    policy.write_text(POLICY + "  datasets: 1d\n")
    settings = make_settings(tmp_path / "site", APPLIANCE_RETENTION_SWEEP_S="0", APPLIANCE_DEFAULT_POLICY=str(policy))
    initialize(settings, CLI_CTX)
    db = open_initialized(settings)
    state = build_state(settings, db)
    try:
        state.identity.create_project(CLI_CTX, "acme")
        with TestClient(create_app(settings, state)) as client:
            state.identity.create_user(CLI_CTX, "olivia")
            state.identity.grant(CLI_CTX, "olivia", Role.DATA_OWNER, "acme")
            token = state.identity.create_token(CLI_CTX, "olivia", Role.DATA_OWNER, "acme")[1]
            file_id = new_file(client, token)
            [expired] = state.retention.sweep(now=utcnow() + timedelta(days=2)).expired
            assert expired.id == file_id and expired.policy_hash == state.policies.default.content_hash
    finally:
        db.dispose()


def test_concurrent_sweepers_shred_each_item_once(client, state, admin_token, owner):
    """Replicas: two sweepers, each on its own engine, race over the same expired items."""
    files = [new_file(client, owner, f"place {i}") for i in range(6)]
    adapters = [publish(state, "acme", f"a{i}") for i in range(3)]
    for f in files:
        age(state, StoredFile, f, 3)
    for a in adapters:
        age(state, AdapterRecord, a, 3)
    set_retention(client, admin_token, "acme", datasets="2d", adapters="2d")
    other_db = Database(state.settings.database_url)
    try:
        other = build_state(state.settings, other_db)
        sweepers: list[RetentionSweeper] = [state.retention, other.retention]
        barrier, results = threading.Barrier(2), [None, None]

        def run(i: int) -> None:
            barrier.wait()
            results[i] = sweepers[i].sweep()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        other_db.dispose()
    assert all(r is not None and r.errors == [] for r in results)
    shredded = [e.id for r in results for e in r.expired]
    assert sorted(shredded) == sorted(files + adapters)  # every item by exactly one sweeper
    counts = Counter(e.resource_id for e in events(state, "file.delete") + events(state, "adapter.delete"))
    assert set(counts) == set(files + adapters) and set(counts.values()) == {1}
    for f in files:
        assert_shredded(state, f)
    assert verify_chain(state.db).ok


@pytest.mark.slow
def test_cli_sweep_prints_what_it_shreds(client, state, admin_token, owner):
    file_id = new_file(client, owner)
    adapter_id = publish(state, "acme", "cli", trained_on=[file_id])
    age(state, StoredFile, file_id, 100)
    set_retention(client, admin_token, "acme", datasets="90d")
    home = state.settings.home.home

    dry = run_cli(home, "retention", "sweep", "--dry-run")
    assert f"would shred dataset {file_id} (project acme, uploaded " in dry.stdout and "retention 90d" in dry.stdout
    assert f"would withdraw adapter {adapter_id} (trained on {file_id})" in dry.stdout
    assert "dry run: 1 dataset(s) and 1 adapter(s) would shred; nothing changed" in dry.stdout
    assert client.get(f"/v1/files/{file_id}", headers=bearer(owner)).status_code == 200

    real = run_cli(home, "retention", "sweep")
    assert f"shredded dataset {file_id}" in real.stdout and f"withdrew adapter {adapter_id}" in real.stdout
    assert client.get(f"/v1/files/{file_id}", headers=bearer(owner)).status_code == 404
    assert_shredded(state, file_id)
    assert state.retention.sweep().expired == []
    assert verify_chain(state.db).ok


def test_the_server_sweeps_at_start_and_on_its_interval(tmp_path):
    settings = make_settings(tmp_path / "srv", APPLIANCE_RETENTION_SWEEP_S="1")
    initialize(settings, CLI_CTX)
    db = open_initialized(settings)
    state = build_state(settings, db)
    try:
        project = state.identity.create_project(CLI_CTX, "acme")
        state.policies.set(CLI_CTX, project, POLICY + "  adapters: 1h\n")
        first = publish(state, "acme", "first")
        age(state, AdapterRecord, first, 1)
        with TestClient(create_app(settings, state)):
            deadline = Deadline(30)
            while key_of(state, "adapter-first").wrapped is not None and not deadline.expired():
                time.sleep(0.1)
            assert_shredded(state, "adapter-first")  # the sweep at start-up
            second = publish(state, "acme", "second")
            age(state, AdapterRecord, second, 1)
            while key_of(state, "adapter-second").wrapped is not None and not deadline.expired():
                time.sleep(0.1)
            assert_shredded(state, "adapter-second")  # a later sweep
        assert {e.actor for e in events(state, "adapter.delete")} == {"system:retention"}
    finally:
        db.dispose()


@pytest.mark.slow
def test_a_trained_adapter_goes_with_its_expired_training_data(client, state, admin_token, owner, consumer, make_token,
                                                               tmp_path):
    """End to end: a real job trains and serves an adapter; its dataset expires; both are shredded."""
    import openai

    from appliance.modelstore import build_tiny_causal_lm
    from tests.integration.test_jobs import api_for, hp, qa, wait_for
    from tests.integration.test_jobs import upload as upload_records

    state.catalog.import_model(CLI_CTX, build_tiny_causal_lm(tmp_path / "tiny-src", seed=0), BASE)
    train_id = upload_records(client, owner, [qa(i) for i in range(16)])
    trainer = api_for(client, make_token("trish", Role.TRAINER, "acme"))
    job = trainer.fine_tuning.jobs.create(model=BASE, training_file=train_id, suffix="kept", seed=3,
                                          method={"type": "lora", "lora": {"hyperparameters": hp(n_epochs=1)}})
    job = wait_for(trainer, job.id)
    assert job.status == "succeeded", job.error
    chat = api_for(client, consumer)
    ask = dict(model=job.fine_tuned_model, messages=[{"role": "user", "content": "What is item 1?"}], max_tokens=4)
    assert chat.chat.completions.create(**ask).choices[0].message.content is not None
    assert state.inference.engine_for(BASE).has_adapter(job.fine_tuned_model)

    age(state, StoredFile, train_id, 31)
    set_retention(client, admin_token, "acme", datasets="30d", adapters="365d")
    result = state.retention.sweep()
    assert [(e.kind, e.id) for e in result.expired] == [("dataset", train_id)]
    assert result.withdrawn == [(job.fine_tuned_model, train_id)]
    assert not state.inference.engine_for(BASE).has_adapter(job.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        chat.chat.completions.create(**ask)
    assert client.get(f"/v1/files/{train_id}/content", headers=bearer(owner)).status_code == 404
    assert_shredded(state, train_id)
    with state.db.read() as s:
        adapter = s.get(AdapterRecord, job.fine_tuned_model)
    assert adapter.deleted_at is not None
    assert_shredded(state, adapter.object_id)
    # The job and its metrics stay: only the data and the model carrying it are gone.
    assert trainer.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    assert verify_chain(state.db).ok
