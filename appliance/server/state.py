"""What the running application holds: settings, database and services."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.db.base import Database
from appliance.identity.auth import FailureLimiter
from appliance.identity.service import IdentityService
from appliance.settings import Settings


@dataclass
class AppState:
    """Services shared by every request; built once by :func:`build_state`."""

    settings: Settings
    db: Database
    identity: IdentityService
    limiter: FailureLimiter


def build_state(settings: Settings, db: Database | None = None) -> AppState:
    db = db or Database(
        settings.database_url, echo=settings.database.echo, busy_timeout_ms=settings.database.busy_timeout_ms
    )
    return AppState(
        settings=settings,
        db=db,
        identity=IdentityService(db),
        limiter=FailureLimiter(settings.auth.max_failures, settings.auth.failure_window_s),
    )
