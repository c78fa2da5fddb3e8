"""The server as admins start it: ``appliance serve`` and ``make run``."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.cli_helpers import Server, run_cli
from tests.conftest import REPO, free_port


def test_appliance_serve_answers_health_and_requires_tokens(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    server = Server(home, free_port())
    try:
        server.wait_healthy()
        assert httpx.get(server.base_url + "/health").json()["status"] == "ok"
        assert httpx.get(server.base_url + "/api/v1/me").status_code == 401
        token = (home / "admin.token").read_text().strip()
        me = httpx.get(server.base_url + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["user"] == "admin"
        assert "Admin token: " + str(home / "admin.token") in server.output()
    finally:
        server.stop()


@pytest.mark.slow  # minutes of compute and no database behaviour of its own: the SQLite pass only
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_initialises_home_on_first_use_and_serves_health(tmp_path):
    home = tmp_path / "var"
    port = free_port()
    server = Server(home, port, argv=["make", "--no-print-directory", "run"], cwd=REPO, APPLIANCE_PORT=str(port))
    try:
        server.wait_healthy()
        out = server.output()
        assert "Initialised" in out and f"Portal:      http://127.0.0.1:{port}/" in out
        assert (home / "admin.token").exists() and (home / "keys" / "master.key").exists()
    finally:
        server.stop()
