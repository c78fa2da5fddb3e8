"""Direct database access for tests that play the attacker (editing rows behind the appliance's back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from tests.conftest import database_url_for


def raw_engine(home: Path) -> Engine:
    """An engine on a test home's database: its PostgreSQL database, or the SQLite file."""
    return create_engine(database_url_for(home) or f"sqlite:///{Path(home) / 'appliance.db'}")


def execute(home: Path, *statements: tuple[str, dict[str, Any]]) -> None:
    engine = raw_engine(home)
    with engine.begin() as conn:
        for sql, params in statements:
            conn.execute(text(sql), params)
    engine.dispose()


def rows(home: Path, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = raw_engine(home)
    with engine.connect() as conn:
        result = [dict(r._mapping) for r in conn.execute(text(sql), params)]
    engine.dispose()
    return result


def dump_all_tables(home: Path) -> str:
    """Every row of every table as text, to search for leaked secrets whatever the database."""
    from sqlalchemy import inspect

    engine = raw_engine(home)
    out = []
    with engine.connect() as conn:
        for table in inspect(engine).get_table_names():
            for r in conn.execute(text(f'SELECT * FROM "{table}"')):
                out.append(f"{table}: {tuple(r)!r}")
    engine.dispose()
    return "\n".join(out)


def is_postgres(home: Path) -> bool:
    return database_url_for(home) is not None


def json_value(home: Path, name: str) -> str:
    """SQL for a JSON-typed bound parameter (PostgreSQL needs a cast from text)."""
    return f"CAST(:{name} AS JSON)" if is_postgres(home) else f":{name}"


def as_params(row: dict[str, Any]) -> dict[str, Any]:
    """Row values ready to bind again (JSON columns come back as dicts on PostgreSQL)."""
    import json

    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
