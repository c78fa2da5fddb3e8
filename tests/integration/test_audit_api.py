"""GET /api/v1/audit/events: who may read, filters, pagination, and reads audited."""

from __future__ import annotations

from datetime import timedelta

from appliance.db.base import utcnow
from appliance.identity.roles import Role
from tests.conftest import bearer


def _seed(client, admin_token) -> None:
    h = bearer(admin_token)
    for name in ("acme", "globex"):
        assert client.post("/api/v1/projects", headers=h, json={"name": name}).status_code == 201
    client.get("/api/v1/me", headers=bearer("apl_000000000000_" + "C" * 43))  # one denial


def test_admin_filters_by_action_outcome_actor_and_time(client, admin_token):
    _seed(client, admin_token)
    h = bearer(admin_token)
    created = client.get("/api/v1/audit/events", headers=h, params={"action": "project.create"}).json()
    assert [e["resource_id"] for e in created["data"]] == ["acme", "globex"]
    assert created["object"] == "list" and created["has_more"] is False
    denied = client.get("/api/v1/audit/events", headers=h, params={"outcome": "denied"}).json()["data"]
    assert [e["action"] for e in denied] == ["auth.denied"]
    by_actor = client.get("/api/v1/audit/events", headers=h, params={"actor": "anonymous"}).json()["data"]
    assert len(by_actor) == 1
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert client.get("/api/v1/audit/events", headers=h, params={"since": future}).json()["data"] == []
    until_past = (utcnow() - timedelta(hours=1)).isoformat()
    assert client.get("/api/v1/audit/events", headers=h, params={"until": until_past}).json()["data"] == []
    resource = client.get("/api/v1/audit/events", headers=h,
                          params={"resource_type": "project", "resource_id": "globex"}).json()["data"]
    assert [e["action"] for e in resource] == ["project.create"]
    event = created["data"][0]
    assert set(event) >= {"seq", "ts", "actor", "auth_method", "action", "resource_type", "resource_id", "project",
                          "outcome", "reason", "origin_ip", "request_id", "details", "prev_hash", "hash"}
    assert event["ts"].endswith("Z") and event["auth_method"].startswith("token:")


def test_cursor_pagination_walks_every_event_once(client, admin_token):
    _seed(client, admin_token)
    h = bearer(admin_token)
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after is not None else {})}
        page = client.get("/api/v1/audit/events", headers=h, params=params).json()
        seen += [e["seq"] for e in page["data"]]
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["seq"]
        after = page["last_id"]
    # Every page read is itself audited, so the log grew while we walked it.
    assert seen == list(range(1, len(seen) + 1)) and len(seen) >= 8


def test_reading_the_log_is_audited_with_the_filters(client, admin_token):
    h = bearer(admin_token)
    client.get("/api/v1/audit/events", headers=h, params={"action": "token.create", "limit": 5})
    last = client.get("/api/v1/audit/events", headers=h, params={"action": "audit.read"}).json()["data"]
    assert last[0]["actor"] == "admin"
    assert last[0]["details"]["filters"] == {"action": "token.create", "limit": 5}


def test_only_auditors_and_admins_read_and_project_auditors_see_their_project(client, admin_token, make_token):
    _seed(client, admin_token)
    for role in (Role.TRAINER, Role.DATA_OWNER, Role.CONSUMER):
        assert client.get("/api/v1/audit/events", headers=bearer(make_token(f"u-{role}", role, "acme"))).status_code == 403
    global_auditor = make_token("greta", Role.AUDITOR)
    everything = client.get("/api/v1/audit/events", headers=bearer(global_auditor)).json()["data"]
    assert {e["project"] for e in everything} >= {"acme", "globex", None}
    acme_auditor = make_token("arno", Role.AUDITOR, "acme")
    own = client.get("/api/v1/audit/events", headers=bearer(acme_auditor), params={"limit": 1000}).json()["data"]
    assert own and {e["project"] for e in own} == {"acme"}


def test_verify_endpoint_reports_an_intact_chain(client, admin_token):
    _seed(client, admin_token)
    status = client.get("/api/v1/audit/verify", headers=bearer(admin_token)).json()
    assert status["ok"] is True and status["bad_seq"] is None and status["events"] == status["head_seq"] >= 4


def test_bad_filter_values_are_400_naming_the_parameter(client, admin_token):
    resp = client.get("/api/v1/audit/events", headers=bearer(admin_token), params={"outcome": "maybe"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "outcome"
    resp = client.get("/api/v1/audit/events", headers=bearer(admin_token), params={"limit": 5000})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "limit"
