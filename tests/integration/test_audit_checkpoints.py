"""Signed checkpoints catch a consistent rewrite of the whole audit chain."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from appliance.audit.chain import event_hash
from tests.cli_helpers import run_cli
from tests.db_helpers import execute, rows
from tests.timing import Deadline


def _rewrite_whole_chain(home, seq_to_edit: int) -> None:
    """What someone with root could do: edit an event and recompute every hash after it, and the head."""
    prev = "0" * 64
    statements = []
    for row in rows(home, "SELECT * FROM audit_events ORDER BY seq"):
        if row["seq"] == seq_to_edit:
            row["actor"] = "someone-else"
        ts = row["ts"] if isinstance(row["ts"], datetime) else datetime.fromisoformat(row["ts"])
        details = row["details"] if isinstance(row["details"], dict) else json.loads(row["details"])
        fields = dict(row, prev_hash=prev, ts=ts.replace(tzinfo=UTC), details=details)
        prev = event_hash(fields)
        statements.append(("UPDATE audit_events SET actor = :actor, prev_hash = :prev, hash = :hash WHERE seq = :seq",
                           {"actor": row["actor"], "prev": fields["prev_hash"], "hash": prev, "seq": row["seq"]}))
    statements.append(("UPDATE audit_head SET hash = :hash WHERE id = 1", {"hash": prev}))
    execute(home, *statements)


def test_checkpoint_verifies_then_catches_a_consistent_rewrite(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    run_cli(home, "projects", "add", "acme")
    cp = tmp_path / "checkpoint.json"
    out = run_cli(home, "audit", "checkpoint", "--out", str(cp)).stdout
    assert "checkpoint of" in out
    doc = json.loads(cp.read_text())
    assert doc["checkpoint"]["tree_size"] >= 3 and doc["signature"] and "BEGIN PUBLIC KEY" in doc["public_key"]
    run_cli(home, "projects", "add", "globex")  # the log grows after the checkpoint
    ok = run_cli(home, "audit", "verify", "--checkpoint", str(cp))
    assert "checkpoint OK" in ok.stdout and "consistency proof verified" in ok.stdout

    _rewrite_whole_chain(home, seq_to_edit=2)
    bad = run_cli(home, "audit", "verify", "--checkpoint", str(cp), check=False)
    assert "audit chain OK" in bad.stdout  # the chain alone cannot tell...
    assert bad.returncode == 1 and "rewritten" in bad.stderr  # ...the checkpoint can


def test_checkpoint_signed_by_another_key_is_refused(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    cp = tmp_path / "cp.json"
    run_cli(home, "audit", "checkpoint", "--out", str(cp))
    other = tmp_path / "other"
    run_cli(other, "init")
    proc = run_cli(other, "audit", "verify", "--checkpoint", str(cp), check=False)
    assert proc.returncode == 1 and "signature does not verify" in proc.stderr


def test_tampered_checkpoint_file_is_refused(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    cp = tmp_path / "cp.json"
    run_cli(home, "audit", "checkpoint", "--out", str(cp))
    doc = json.loads(cp.read_text())
    doc["checkpoint"]["tree_size"] -= 1
    cp.write_text(json.dumps(doc))
    proc = run_cli(home, "audit", "verify", "--checkpoint", str(cp), check=False)
    assert proc.returncode == 1 and "signature" in proc.stderr


def test_proof_endpoints(client, admin_token):
    from appliance.audit import merkle
    from tests.conftest import bearer

    h = bearer(admin_token)
    for name in ("a", "b", "c", "d"):
        client.post("/api/v1/projects", headers=h, json={"name": name})
    cp = client.post("/api/v1/audit/checkpoints", headers=h).json()
    size = cp["checkpoint"]["tree_size"]
    root = bytes.fromhex(cp["checkpoint"]["root_hash"])
    proof = client.get("/api/v1/audit/proofs/inclusion", headers=h, params={"seq": 2, "tree_size": size}).json()
    assert merkle.verify_inclusion(bytes.fromhex(proof["leaf_hash"]), 1, size,
                                   [bytes.fromhex(p) for p in proof["proof"]], root)
    client.post("/api/v1/projects", headers=h, json={"name": "e"})
    cons = client.get("/api/v1/audit/proofs/consistency", headers=h, params={"first": size}).json()
    assert merkle.verify_consistency(size, cons["second"], root, bytes.fromhex(cons["second_root"]),
                                     [bytes.fromhex(p) for p in cons["proof"]])


def test_the_server_signs_checkpoints_periodically(home):
    from litestar.testing import TestClient

    from appliance.audit.models import AuditCheckpoint
    from appliance.bootstrap import open_initialized
    from appliance.server.app import create_app
    from appliance.server.state import build_state
    from tests.conftest import make_settings

    settings = make_settings(home.home.home, APPLIANCE_AUDIT_CHECKPOINT_INTERVAL_S="1")
    state = build_state(settings, open_initialized(settings))
    import time

    from sqlalchemy import select

    with TestClient(create_app(settings, state)):
        deadline = Deadline(20)
        while True:
            with state.db.read() as s:
                cps = list(s.scalars(select(AuditCheckpoint)))
            if cps or deadline.expired():
                break
            time.sleep(0.3)
    assert cps and cps[0].tree_size >= 2 and cps[0].signature
    state.db.dispose()
