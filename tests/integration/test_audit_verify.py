"""``appliance audit verify`` against direct edits of the database (SQLite file or PostgreSQL)."""

from __future__ import annotations

import pytest

from tests.cli_helpers import run_cli
from tests.db_helpers import as_params, execute, json_value, rows

COLUMNS = ("seq", "ts", "actor", "auth_method", "action", "resource_type", "resource_id", "project", "outcome",
           "reason", "origin_ip", "request_id", "details", "prev_hash", "hash")


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    for name in ("acme", "globex", "initech"):
        run_cli(home, "projects", "add", name)
    run_cli(home, "users", "add", "alice", "--role", "trainer", "--project", "acme")
    return home


def _verify(home):
    return run_cli(home, "audit", "verify", check=False)


def _bind(home, column: str) -> str:
    return json_value(home, column) if column == "details" else f":{column}"


def _insert(home, row: dict) -> None:
    cols = ", ".join(COLUMNS)
    values = ", ".join(_bind(home, c) for c in COLUMNS)
    execute(home, (f"INSERT INTO audit_events ({cols}) VALUES ({values})", as_params({c: row[c] for c in COLUMNS})))


def test_untouched_chain_verifies(home):
    proc = _verify(home)
    assert proc.returncode == 0, proc.stderr
    assert "audit chain OK" in proc.stdout


def test_edited_row_is_detected_at_its_seq(home):
    execute(home, ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 4", {}))
    proc = _verify(home)
    assert proc.returncode == 1
    assert "BROKEN at seq 4" in proc.stderr and "altered" in proc.stderr


def test_edited_details_are_detected(home):
    execute(home, (f"UPDATE audit_events SET details = {json_value(home, 'd')} WHERE seq = 1",
                   {"d": '{"admin_user": "eve"}'}))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 1" in proc.stderr


def test_deleted_row_is_detected(home):
    execute(home, ("DELETE FROM audit_events WHERE seq = 3", {}))
    proc = _verify(home)
    assert proc.returncode == 1
    assert "BROKEN at seq 3" in proc.stderr and "missing" in proc.stderr


def test_deleted_newest_rows_are_detected_against_the_head(home):
    execute(home, ("DELETE FROM audit_events WHERE seq >= 6", {}))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 6" in proc.stderr


def test_swapped_rows_are_detected(home):
    # Exchange the contents of events 3 and 5 while keeping seq order.
    three, five = (rows(home, "SELECT * FROM audit_events WHERE seq = :s", s=s)[0] for s in (3, 5))
    sets = ", ".join(f"{c} = {_bind(home, c)}" for c in COLUMNS if c != "seq")
    execute(home, (f"UPDATE audit_events SET {sets} WHERE seq = 3", as_params({**five, "seq": 3})),
            (f"UPDATE audit_events SET {sets} WHERE seq = 5", as_params({**three, "seq": 5})))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 3" in proc.stderr


def test_inserted_row_is_detected(home):
    copy = rows(home, "SELECT * FROM audit_events WHERE seq = 2")[0]
    # Renumber everything after 2 up by one and slip a copy in at 3.
    execute(home, ("UPDATE audit_events SET seq = seq + 1000 WHERE seq > 2", {}),
            ("UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000", {}))
    _insert(home, {**copy, "seq": 3})
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 3" in proc.stderr


def test_appended_forgery_is_detected(home):
    last = rows(home, "SELECT * FROM audit_events ORDER BY seq DESC LIMIT 1")[0]
    _insert(home, {**last, "seq": last["seq"] + 1})
    proc = _verify(home)
    assert proc.returncode == 1 and f"BROKEN at seq {last['seq'] + 1}" in proc.stderr
