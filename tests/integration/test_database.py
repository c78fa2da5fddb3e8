"""Schema migrations and concurrent audit appends on the embedded database."""

from __future__ import annotations

import threading

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text

import appliance.models  # noqa: F401
from appliance.audit.models import AuditEvent
from appliance.audit.service import AuditContext, record, verify_chain
from appliance.db.base import Base, Database
from appliance.migrations import current_revision, head_revision, upgrade_to_head


def _database(tmp_path, name: str) -> Database:
    from tests.conftest import database_url_for

    return Database(database_url_for(tmp_path / name) or f"sqlite:///{tmp_path / name}.db")


def test_migrations_build_exactly_the_models_schema(tmp_path):
    db = _database(tmp_path, "m")
    upgrade_to_head(db)
    upgrade_to_head(db)  # idempotent
    assert current_revision(db) == head_revision(db)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations differ; write a migration: {diff}"
        if db.is_sqlite:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    assert {"audit_events", "audit_head", "projects", "users", "role_bindings", "api_tokens"} <= set(
        inspect(db.engine).get_table_names()
    )
    db.dispose()


def test_concurrent_appends_keep_one_unbroken_chain(tmp_path):
    db = _database(tmp_path, "c")
    upgrade_to_head(db)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                with db.transaction() as s:
                    # read-then-write inside one transaction, as services do
                    s.scalar(select(func.count()).select_from(AuditEvent))
                    record(s, AuditContext(actor=f"w{n}", auth_method="test"), "test.append", details={"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = verify_chain(db)
    assert result.ok and result.events == 150 and result.head_seq == 150
    db.dispose()


def test_rolled_back_action_leaves_no_event(tmp_path):
    db = _database(tmp_path, "r")
    upgrade_to_head(db)
    try:
        with db.transaction() as s:
            record(s, AuditContext(actor="a", auth_method="test"), "test.fail")
            raise RuntimeError("action failed after auditing")
    except RuntimeError:
        pass
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 0
    assert verify_chain(db).ok
    db.dispose()


def test_concurrent_writers_of_one_row_conflict_cleanly(tmp_path):
    """SQLite serialises writers; PostgreSQL needs row locks and unique indexes to do as well."""
    from appliance.errors import ConflictError
    from appliance.identity.roles import Role
    from appliance.identity.service import IdentityService

    db = _database(tmp_path, "w")
    upgrade_to_head(db)
    identity = IdentityService(db)
    ctx = AuditContext(actor="t", auth_method="test")
    identity.create_user(ctx, "alice")
    identity.grant(ctx, "alice", Role.AUDITOR, None)
    token = identity.create_token(ctx, "alice", Role.AUDITOR, None)[0]
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def race(action) -> None:
        barrier.wait()
        try:
            action()
            outcomes.append("ok")
        except ConflictError:
            outcomes.append("conflict")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=race, args=(lambda: identity.create_project(ctx, "acme"),)) for _ in range(4)]
    threads += [threading.Thread(target=race, args=(lambda: identity.revoke_token(ctx, token.token_id),))
                for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["ok"] * 5
    with db.read() as s:
        actions = list(s.scalars(select(AuditEvent.action)))
    assert actions.count("project.create") == 1 and actions.count("token.revoke") == 1
    assert verify_chain(db).ok
    db.dispose()
