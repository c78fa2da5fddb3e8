"""The server as admins start it: ``appliance serve`` and ``make run``."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from appliance import __version__
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
        assert (home / "admin.token").exists() and (home / "keys" / "master.key").exists()
        # What the README shows, and nothing else: no echoed commands, no libraries' start-up log lines
        # (progress bars of the demo model's import aside), then only our request log. Before it, make may
        # refresh .venv (when the Makefile or the lock changed since it was built): its lines are make's.
        lines = [line for line in out.splitlines() if line.strip() and "%|" not in line]
        lines = lines[next(i for i, line in enumerate(lines) if line.startswith("Initialised ")):]
        listening = next(i for i, line in enumerate(lines) if line.startswith("Appliance "))
        head, banner, rest = lines[:listening], lines[listening:listening + 4], lines[listening + 4:]
        assert head[:3] == [f"Initialised {home}",
                            f"  master key:  {home / 'keys' / 'master.key'} (mode 0600; back it up: without it "
                            "nothing can be decrypted)", f"  admin token: {home / 'admin.token'} (mode 0600)"]
        assert head[3].startswith("importing ") and head[-1].startswith("imported SmolLM2-135M-Instruct: ")
        assert all(line.startswith("  ") for line in head[4:-1]), head
        assert banner == [f"Appliance {__version__} listening on http://127.0.0.1:{port}",
                          f"  Portal:      http://127.0.0.1:{port}/",
                          f"  API:         http://127.0.0.1:{port}/v1  (OpenAPI: /schema/openapi.json)",
                          f"  Admin token: {home / 'admin.token'}"]
        assert rest and all(json.loads(line)["logger"] == "appliance.access" for line in rest), rest
    finally:
        server.stop()
