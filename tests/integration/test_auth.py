"""Authentication and access control over HTTP: every denial answered and audited."""

from __future__ import annotations

from datetime import timedelta

import pytest
from litestar.testing import TestClient
from sqlalchemy import select, update

from appliance.audit.models import AuditEvent
from appliance.db.base import utcnow
from appliance.identity.models import ApiToken
from appliance.identity.roles import Role
from appliance.server.app import create_app
from appliance.server.state import build_state
from tests.conftest import bearer


def events(state, **where) -> list[AuditEvent]:
    with state.db.read() as s:
        stmt = select(AuditEvent).order_by(AuditEvent.seq)
        for k, v in where.items():
            stmt = stmt.where(getattr(AuditEvent, k) == v)
        return list(s.scalars(stmt))


def assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"code", "message", "param"}
    assert body["error"]["code"] == code, body
    return body["error"]


def test_health_needs_no_token(client):
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    assert resp.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "token_missing"),
        ({"Authorization": "Bearer not-a-token"}, "token_malformed"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "token_malformed"),
        ({"Authorization": "Bearer apl_000000000000_" + "A" * 43}, "token_invalid"),
    ],
)
def test_missing_malformed_and_unknown_tokens_get_401_and_are_audited(client, state, headers, code):
    resp = client.get("/api/v1/me", headers=headers)
    err = assert_error(resp, 401, code)
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "apl_" not in err["message"] and "dXNlcjpwYXNz" not in err["message"]
    [event] = events(state, action="auth.denied")
    assert event.outcome == "denied" and event.reason == code
    assert event.actor == "anonymous" and event.resource_id == "GET /api/v1/me"
    assert event.request_id == resp.headers["x-request-id"]
    assert event.origin_ip == "testclient"


def test_wrong_secret_for_a_real_token_id_is_invalid(client, make_token):
    token = make_token("alice", Role.TRAINER, "acme")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert_error(client.get("/api/v1/me", headers=bearer(forged)), 401, "token_invalid")


def test_revoked_token_gets_401_audited_with_its_owner(client, state, make_token, admin_token):
    token = make_token("alice", Role.TRAINER, "acme")
    assert client.get("/api/v1/me", headers=bearer(token)).status_code == 200
    token_id = token.split("_")[1]
    revoke = client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(admin_token))
    assert revoke.status_code == 200 and revoke.json()["revoked_at"]
    assert_error(client.get("/api/v1/me", headers=bearer(token)), 401, "token_revoked")
    [event] = events(state, action="auth.denied")
    assert (event.actor, event.auth_method, event.reason) == ("alice", f"token:{token_id}", "token_revoked")
    assert events(state, action="token.revoke")[0].actor == "admin"


def test_expired_token_gets_401(client, state, make_token):
    token = make_token("alice", Role.TRAINER, "acme", expires_at=utcnow() + timedelta(hours=1))
    assert client.get("/api/v1/me", headers=bearer(token)).status_code == 200
    with state.db.transaction() as s:
        s.execute(update(ApiToken).where(ApiToken.token_id == token.split("_")[1])
                  .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert_error(client.get("/api/v1/me", headers=bearer(token)), 401, "token_expired")
    assert events(state, action="auth.denied")[0].reason == "token_expired"


def test_role_without_the_right_gets_403_and_is_audited(client, state, make_token):
    token = make_token("carol", Role.CONSUMER, "acme")
    err = assert_error(client.get("/api/v1/audit/events", headers=bearer(token)), 403, "permission_denied")
    assert "consumer" in err["message"] and "audit:read" in err["message"]
    [event] = events(state, action="access.denied")
    assert (event.actor, event.project, event.outcome) == ("carol", "acme", "denied")
    # Creating tokens is admin-only, even for a project's data owner.
    owner = make_token("dora", Role.DATA_OWNER, "acme")
    assert_error(client.post("/api/v1/tokens", headers=bearer(owner),
                             json={"user": "dora", "role": "data-owner", "project": "acme"}), 403, "permission_denied")


def test_another_projects_resource_answers_404_like_a_missing_one_and_is_audited(client, state, make_token, admin_token):
    alice = make_token("alice", Role.TRAINER, "acme")
    make_token("bob", Role.TRAINER, "globex")
    assert client.get("/api/v1/projects/acme", headers=bearer(alice)).status_code == 200
    other = client.get("/api/v1/projects/globex", headers=bearer(alice))
    missing = client.get("/api/v1/projects/initech", headers=bearer(alice))
    assert_error(other, 404, "not_found")
    assert_error(missing, 404, "not_found")
    assert other.json()["error"]["message"] == "project 'globex' not found"
    assert assert_error(client.get("/api/v1/projects/globex/members", headers=bearer(alice)), 404, "not_found")
    denied = events(state, action="access.denied")
    assert [e.resource_id for e in denied] == ["GET /api/v1/projects/globex", "GET /api/v1/projects/globex/members"]
    assert all(e.actor == "alice" and e.outcome == "denied" for e in denied)
    # Listing shows only the caller's project; the admin sees both.
    names = [p["name"] for p in client.get("/api/v1/projects", headers=bearer(alice)).json()["data"]]
    assert names == ["acme"]
    names = [p["name"] for p in client.get("/api/v1/projects", headers=bearer(admin_token)).json()["data"]]
    assert names == ["acme", "globex"]


def test_repeated_failures_from_one_origin_are_rate_limited_and_audited(home, make_token):
    from appliance.bootstrap import open_initialized
    from tests.conftest import make_settings

    settings = make_settings(home.home.home, APPLIANCE_AUTH_MAX_FAILURES="3")
    state = build_state(settings, open_initialized(settings))
    valid = state.identity.create_token  # noqa: F841 (token made below through the service)
    with TestClient(create_app(settings, state)) as client:
        admin = settings.home.admin_token_file.read_text().strip()
        for _ in range(3):
            assert_error(client.get("/api/v1/me", headers=bearer("apl_000000000000_" + "B" * 43)), 401, "token_invalid")
        limited = client.get("/api/v1/me", headers=bearer("apl_000000000000_" + "B" * 43))  # a wrong token waits
        err = assert_error(limited, 429, "rate_limited")
        assert int(limited.headers["retry-after"]) >= 1 and "retry" in err["message"]
        # A valid token is never refused because of failures from its address: no one guesses 256 bits.
        assert client.get("/api/v1/me", headers=bearer(admin)).status_code == 200
        assert events(state, action="auth.rate_limited")[0].origin_ip == "testclient"
        assert len(events(state, action="auth.denied")) == 3
    state.db.dispose()


def test_schema_needs_a_token_and_lists_the_routes(client, admin_token):
    assert client.get("/schema/openapi.json").status_code == 401
    resp = client.get("/schema/openapi.json", headers=bearer(admin_token))
    assert resp.status_code == 200
    assert {"/health", "/api/v1/audit/events", "/api/v1/tokens"} <= set(resp.json()["paths"])


def test_every_route_declares_a_permission_or_is_public(client):
    from appliance.identity.auth import PERMISSION_OPT, PORTAL_OPT, PUBLIC_OPT
    from appliance.identity.roles import Permission

    for route in client.app.routes:
        for handler in getattr(route, "route_handlers", []):
            if route.path.startswith("/schema") or handler.http_methods == {"OPTIONS"}:
                continue
            opt = handler.opt
            # Portal pages without a permission (start page, log-out, role switch) still need a session.
            assert opt.get(PUBLIC_OPT) or opt.get(PORTAL_OPT) or Permission(opt[PERMISSION_OPT]), route.path
    public = sorted({r.path for r in client.app.routes for h in getattr(r, "route_handlers", [])
                     if h.opt.get(PUBLIC_OPT)})
    assert public == ["/health", "/login", "/static/{file_path:path}"]
    # Even OPTIONS needs a token everywhere else.
    assert client.options("/api/v1/projects").status_code == 401


def test_validation_errors_name_the_field(client, admin_token):
    err = assert_error(client.post("/api/v1/projects", headers=bearer(admin_token), json={"name": 5}), 400, "invalid_request")
    assert err["param"] == "name"
    err = assert_error(client.post("/api/v1/projects", headers=bearer(admin_token), json={"name": "Bad Name"}), 400, "invalid_request")
    assert err["param"] == "name" and "'Bad Name'" in err["message"]
    err = assert_error(client.post("/api/v1/tokens", headers=bearer(admin_token),
                                   json={"user": "admin", "role": "wizard"}), 400, "invalid_request")
    assert err["param"] == "role" and "wizard" in err["message"]
    client.post("/api/v1/projects", headers=bearer(admin_token), json={"name": "acme"})
    err = assert_error(client.post("/api/v1/projects", headers=bearer(admin_token), json={"name": "acme"}), 409, "conflict")
    assert err["param"] == "name"


def test_admin_api_creates_users_grants_and_tokens_that_work(client, state, admin_token):
    h = bearer(admin_token)
    assert client.post("/api/v1/projects", headers=h, json={"name": "acme"}).status_code == 201
    assert client.post("/api/v1/users", headers=h, json={"name": "erin"}).status_code == 201
    err = assert_error(client.post("/api/v1/tokens", headers=h, json={"user": "erin", "role": "trainer", "project": "acme"}),
                       400, "invalid_request")
    assert "appliance users grant erin --role trainer --project acme" in err["message"]
    granted = client.post("/api/v1/users/erin/roles", headers=h, json={"role": "trainer", "project": "acme"})
    assert granted.status_code == 201 and granted.json()["roles"] == [{"role": "trainer", "project": "acme"}]
    created = client.post("/api/v1/tokens", headers=h, json={"user": "erin", "role": "trainer", "project": "acme"})
    assert created.status_code == 201
    token = created.json()["token"]
    me = client.get("/api/v1/me", headers=bearer(token)).json()
    assert me == {"user": "erin", "role": "trainer", "project": "acme", "token_id": created.json()["id"]}
    listed = client.get("/api/v1/tokens", headers=h).json()["data"]
    assert all("token" not in t for t in listed) and created.json()["id"] in [t["id"] for t in listed]
    actions = [e.action for e in events(state, actor="admin")]
    assert actions == ["project.create", "user.create", "role.grant", "token.create"]


def test_failed_log_ins_are_filed_under_each_project_of_the_account(state):
    """A project auditor sees failed log-ins on its members' accounts: one denied ``portal.login`` per
    project the user works in; an appliance-wide user's has no project; an unknown name is not recorded
    (it may be a password typed into the wrong box); a disabled account says so to the auditor only."""
    from appliance.errors import AuthenticationError
    from tests.conftest import CLI_CTX

    for project in ("acme", "globex"):
        state.identity.create_project(CLI_CTX, project)
    state.identity.create_user(CLI_CTX, "dana")
    state.sessions.set_password(CLI_CTX, "dana", "correct horse battery staple")
    state.identity.grant(CLI_CTX, "dana", Role.DATA_OWNER, "acme")
    state.identity.grant(CLI_CTX, "dana", Role.TRAINER, "globex")
    state.identity.create_user(CLI_CTX, "root2")
    state.sessions.set_password(CLI_CTX, "root2", "correct horse battery staple")
    state.identity.grant(CLI_CTX, "root2", Role.ADMIN, None)

    for user, password in (("dana", "wrong"), ("root2", "wrong"), ("Tr0ub4dor&3", "x")):
        with pytest.raises(AuthenticationError):
            state.sessions.login(user, password, "10.0.0.7")
    failed = [(e.actor, e.resource_id, e.project, e.reason, e.origin_ip)
              for e in events(state, action="portal.login", outcome="denied")]
    assert failed == [
        ("dana", "dana", "acme", "wrong username or password", "10.0.0.7"),
        ("dana", "dana", "globex", "wrong username or password", "10.0.0.7"),
        ("root2", "root2", None, "wrong username or password", "10.0.0.7"),
        ("anonymous", None, None, "wrong username or password", "10.0.0.7"),
    ]
    assert "Tr0ub4dor" not in str([e.details for e in events(state, action="portal.login")])

    from appliance.identity.models import User

    with state.db.transaction() as s:
        s.execute(update(User).where(User.name == "dana").values(disabled=True))
    with pytest.raises(AuthenticationError, match="wrong username or password"):  # the client learns nothing
        state.sessions.login("dana", "correct horse battery staple", "10.0.0.7")
    assert {(e.project, e.reason) for e in events(state, action="portal.login", outcome="denied")[4:]} == {
        ("acme", "account disabled"), ("globex", "account disabled")}
