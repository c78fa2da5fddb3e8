"""Alembic migrations of the whole schema, applied programmatically by ``appliance init`` and ``serve``.

A package of its own, above every feature package: its environment imports every table
(:mod:`appliance.models`), which :mod:`appliance.db` (the layer every package uses) must not.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from appliance.db.base import Database

MIGRATIONS_DIR = Path(__file__).parent


def alembic_config(db: Database) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = db.engine
    return cfg


def upgrade_to_head(db: Database) -> None:
    """Bring the schema to the newest revision (no-op when already there)."""
    command.upgrade(alembic_config(db), "head")


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(db: Database) -> str | None:
    return ScriptDirectory.from_config(alembic_config(db)).get_current_head()
