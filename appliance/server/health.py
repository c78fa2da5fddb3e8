"""``GET /health``: the only route reachable without a token."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from sqlalchemy import text

from appliance import __version__
from appliance.identity.auth import PUBLIC_OPT
from appliance.services import AppState


@get("/health", opt={PUBLIC_OPT: True}, tags=["health"], security=[{}], sync_to_thread=True)
def health(appliance: NamedDependency[AppState]) -> dict[str, str]:
    """Liveness and database reachability; reveals nothing else."""
    with appliance.db.read() as s:
        s.execute(text("SELECT 1"))
    return {"status": "ok", "version": __version__}
