"""Engine and transaction helpers shared by every feature area.

SQLite (WAL) is the embedded default; PostgreSQL works through the same code
by setting ``APPLIANCE_DATABASE_URL``. Services own their transactions with
:meth:`Database.transaction`, so an action and the audit event recording it
commit or roll back together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and always returned timezone-aware.

    SQLite drops offsets; PostgreSQL keeps them. Normalising on the way in and
    out makes both back ends return identical values, which the audit hash
    chain depends on.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.replace(tzinfo=UTC)


def created_before(s: Session, table: type[Base], until: datetime, project_id: int | None = None) -> list[Any]:
    """Rows of a project-owned ``table`` created before ``until`` (deleted ones too), of one project or all,
    oldest first: what audit reports list."""
    stmt = select(table).where(table.created_at < until)
    if project_id is not None:
        stmt = stmt.where(table.project_id == project_id)
    return list(s.scalars(stmt.order_by(table.created_at)))


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        # Take over transaction control from the sqlite3 module so that we can
        # issue BEGIN IMMEDIATE for writers (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front: a deferred transaction that
        # reads and then writes fails with SQLITE_BUSY instead of waiting when
        # another writer committed in between (WAL snapshot rule).
        mode = "IMMEDIATE" if conn.get_execution_options().get("appliance_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """An engine plus the two kinds of session the services use.

    Args:
        url: SQLAlchemy database URL.
        echo: Log every statement.
        busy_timeout_ms: How long SQLite waits for a lock.
    """

    def __init__(self, url: str, *, echo: bool = False, busy_timeout_ms: int = 30_000) -> None:
        self.url = make_url(url)
        kwargs: dict = {"echo": echo, "future": True}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine, busy_timeout_ms)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(appliance_write=True), expire_on_commit=False
        )

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write transaction: commits on success, rolls back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work; nothing it does is committed."""
        # Closing (not rolling back) ends the transaction without expiring
        # the objects read, so callers can use them afterwards.
        with self._reader() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
