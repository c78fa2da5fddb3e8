"""First-run set-up of ``$APPLIANCE_HOME`` and opening an initialised one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.service import AuditContext, record
from appliance.crypto.keyfile import create_keyring, load_keyring
from appliance.db.base import Database
from appliance.errors import NotInitializedError
from appliance.identity.roles import Role
from appliance.identity.service import create_first_admin, has_users
from appliance.migrations import upgrade_to_head
from appliance.settings import Settings

ADMIN_USER = "admin"


@dataclass(frozen=True)
class InitResult:
    created: bool
    home: Path
    key_file: Path
    admin_token_file: Path


def open_database(settings: Settings) -> Database:
    return Database(settings.database_url, echo=settings.database.echo, busy_timeout_ms=settings.database.busy_timeout_ms)


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _write_secret_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


def _has_users(db: Database) -> bool:
    with db.read() as s:
        return has_users(s)


def initialize(settings: Settings, ctx: AuditContext) -> InitResult:
    """Create the home, the master key, the schema, the first admin and its token.

    Idempotent: an already initialised home is left as it is.
    """
    home = settings.home.home
    token_file = settings.home.admin_token_file
    for d in (home, settings.home.logs_dir, settings.home.data_dir):
        _mkdir_private(d)
    if not settings.key_file.exists():
        create_keyring(settings.key_file)
    load_keyring(settings.key_file)  # refuses a key file others can read
    db = open_database(settings)
    try:
        upgrade_to_head(db)
        if _has_users(db):
            return InitResult(False, home, settings.key_file, token_file)
        with db.transaction() as s:
            issued = create_first_admin(s, ADMIN_USER)
            record(s, ctx, "system.init", resource_type="appliance", resource_id=str(home),
                   details={"admin_user": ADMIN_USER, "key_file": str(settings.key_file)})
            record(s, ctx, "token.create", resource_type="token", resource_id=issued.token_id,
                   details={"user": ADMIN_USER, "role": Role.ADMIN.value, "expires_at": None})
            # Written inside the transaction: if the file cannot be written,
            # nothing is committed and init can simply be run again.
            token_file.unlink(missing_ok=True)
            _write_secret_file(token_file, issued.value)
        return InitResult(True, home, settings.key_file, token_file)
    finally:
        db.dispose()


def open_initialized(settings: Settings) -> Database:
    """The database of an initialised home, migrated to head; else :class:`NotInitializedError`."""
    load_keyring(settings.key_file)
    db = open_database(settings)
    upgrade_to_head(db)
    if not _has_users(db):
        db.dispose()
        raise NotInitializedError(
            f"{settings.home.home} is not initialised: run `appliance init` first", param="APPLIANCE_HOME"
        )
    return db
