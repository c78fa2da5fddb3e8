"""``appliance audit verify`` against direct edits of the SQLite file."""

from __future__ import annotations

import sqlite3

import pytest

from tests.cli_helpers import run_cli


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    for name in ("acme", "globex", "initech"):
        run_cli(home, "projects", "add", name)
    run_cli(home, "users", "add", "alice", "--role", "trainer", "--project", "acme")
    return home


def _sql(home, *statements: tuple[str, tuple]) -> None:
    con = sqlite3.connect(home / "appliance.db")
    with con:
        for sql, args in statements:
            con.execute(sql, args)
    con.close()


def _verify(home):
    return run_cli(home, "audit", "verify", check=False)


def test_untouched_chain_verifies(home):
    proc = _verify(home)
    assert proc.returncode == 0, proc.stderr
    assert "audit chain OK" in proc.stdout


def test_edited_row_is_detected_at_its_seq(home):
    _sql(home, ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 4", ()))
    proc = _verify(home)
    assert proc.returncode == 1
    assert "BROKEN at seq 4" in proc.stderr and "altered" in proc.stderr


def test_edited_details_are_detected(home):
    _sql(home, ("UPDATE audit_events SET details = '{\"admin_user\": \"eve\"}' WHERE seq = 1", ()))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 1" in proc.stderr


def test_deleted_row_is_detected(home):
    _sql(home, ("DELETE FROM audit_events WHERE seq = 3", ()))
    proc = _verify(home)
    assert proc.returncode == 1
    assert "BROKEN at seq 3" in proc.stderr and "missing" in proc.stderr


def test_deleted_newest_rows_are_detected_against_the_head(home):
    _sql(home, ("DELETE FROM audit_events WHERE seq >= 6", ()))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 6" in proc.stderr


def test_swapped_rows_are_detected(home):
    # Exchange the contents of events 3 and 5 while keeping seq order.
    cols = "ts, actor, auth_method, action, resource_type, resource_id, project, outcome, reason, origin_ip, " \
           "request_id, details, prev_hash, hash"
    con = sqlite3.connect(home / "appliance.db")
    rows = {seq: con.execute(f"SELECT {cols} FROM audit_events WHERE seq = ?", (seq,)).fetchone() for seq in (3, 5)}
    con.close()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    _sql(home, (f"UPDATE audit_events SET {sets} WHERE seq = 3", rows[5]),
         (f"UPDATE audit_events SET {sets} WHERE seq = 5", rows[3]))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 3" in proc.stderr


def test_inserted_row_is_detected(home):
    con = sqlite3.connect(home / "appliance.db")
    row = con.execute("SELECT * FROM audit_events WHERE seq = 2").fetchone()
    con.close()
    # Renumber everything after 2 up by one and slip a copy in at 3.
    _sql(home,
         ("UPDATE audit_events SET seq = seq + 1000 WHERE seq > 2", ()),
         ("UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000", ()),
         (f"INSERT INTO audit_events VALUES ({', '.join('?' * len(row))})", (3, *row[1:])))
    proc = _verify(home)
    assert proc.returncode == 1 and "BROKEN at seq 3" in proc.stderr


def test_appended_forgery_is_detected(home):
    con = sqlite3.connect(home / "appliance.db")
    row = list(con.execute("SELECT * FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone())
    con.close()
    row[0] += 1
    _sql(home, (f"INSERT INTO audit_events VALUES ({', '.join('?' * len(row))})", tuple(row)))
    proc = _verify(home)
    assert proc.returncode == 1 and f"BROKEN at seq {row[0]}" in proc.stderr
