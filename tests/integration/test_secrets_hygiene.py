"""After a scripted session, no token or key material is in logs, audit rows, errors or the database."""

from __future__ import annotations

import base64
import json

import httpx

from tests.cli_helpers import Server, run_cli
from tests.conftest import free_port
from tests.db_helpers import dump_all_tables, rows


def _key_material(home) -> list[bytes]:
    doc = json.loads((home / "keys" / "master.key").read_text())
    out = []
    for b64 in doc["keys"].values():
        raw = base64.b64decode(b64)
        out += [b64.encode(), raw, raw.hex().encode(), base64.urlsafe_b64encode(raw).rstrip(b"=")]
    return out


def test_no_token_or_key_material_leaks_anywhere(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    admin = (home / "admin.token").read_text().strip()
    secrets: list[str] = [admin]
    bodies: list[str] = []
    server = Server(home, free_port(), APPLIANCE_LOG_LEVEL="DEBUG")
    try:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url) as http:
            h = {"Authorization": f"Bearer {admin}"}
            http.post("/api/v1/projects", headers=h, json={"name": "acme"})
            http.post("/api/v1/users", headers=h, json={"name": "alice"})
            http.post("/api/v1/users/alice/roles", headers=h, json={"role": "trainer", "project": "acme"})
            created = http.post("/api/v1/tokens", headers=h, json={"user": "alice", "role": "trainer", "project": "acme"})
            alice = created.json()["token"]
            secrets.append(alice)
            ah = {"Authorization": f"Bearer {alice}"}
            assert http.get("/api/v1/me", headers=ah).status_code == 200
            forged = alice[:-6] + "ZZZZZZ"
            secrets.append(forged)
            attempts = [
                http.get("/api/v1/audit/events", headers=ah),                       # 403
                http.get("/api/v1/me", headers={"Authorization": f"Bearer {forged}"}),  # wrong secret
                http.get("/api/v1/me", headers={"Authorization": f"Token {alice}"}),  # wrong scheme
                http.get(f"/api/v1/me?token={alice}"),                                # token in query string
                http.get("/api/v1/me", headers={**ah, "X-Request-ID": alice}),        # token as request id
                http.post("/api/v1/projects", headers=h, json={"name": alice}),       # token as a field value
                http.post("/api/v1/tokens", headers=h, json={"user": alice, "role": "admin"}),
            ]
            bodies += [r.text for r in attempts]
            token_id = alice.split("_")[1]
            http.delete(f"/api/v1/tokens/{token_id}", headers=h)
            bodies.append(http.get("/api/v1/me", headers=ah).text)
            bodies.append(http.get("/api/v1/audit/events", headers=h, params={"limit": 1000}).text)
    finally:
        server.stop()
    cli_token = run_cli(home, "tokens", "create", "--user", "admin", "--role", "admin").stdout.strip()
    secrets.append(cli_token)
    run_cli(home, "tokens", "revoke", cli_token)  # the whole token pasted by mistake: accepted, never echoed

    needles = [s.encode() for s in secrets] + [s.split("_", 2)[2].encode() for s in secrets] + _key_material(home)
    haystacks: dict[str, bytes] = {"server output": server.output().encode(), "error bodies": "\n".join(bodies).encode()}
    for path in (home / "logs").iterdir():
        haystacks[f"log {path.name}"] = path.read_bytes()
    audit_rows = rows(home, "SELECT * FROM audit_events")
    assert len(audit_rows) >= 15
    haystacks["audit table"] = repr(audit_rows).encode()
    haystacks["every table"] = dump_all_tables(home).encode()
    for path in home.rglob("*"):  # the whole home: database, WAL, blobs, keys' neighbours, logs
        if path.is_file() and path.name not in ("admin.token", "master.key", "signing.key"):
            haystacks[str(path.relative_to(home))] = path.read_bytes()
    assert b'"path": "/api/v1/me"' in haystacks["log appliance.log"]  # the log did record the requests
    for where, data in haystacks.items():
        for needle in needles:
            assert needle not in data, f"secret material found in {where}"
