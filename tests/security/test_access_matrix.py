"""The access matrix: every route × every role × own project / other project, plus no credential.

The routes come from the application's route table and the expected answer
from each handler's declared permission and :data:`ROLE_PERMISSIONS`; this
module only says *how to call* each route (:data:`ROUTES`). A route added
later fails :func:`test_every_route_is_classified` until it is given an entry
here, so the matrix cannot silently go stale.

Per cell:

* allowed: neither 401 nor 403 (nor a 5xx);
* denied: 403 in the error shape, and an ``access.denied`` audit event for
  that very request;
* another project's resource (callers hold roles in ``acme``; ``globex`` is the
  other project): 404 exactly like a missing resource, audited as a denial,
  with none of the other project's data in the body; lists and reports stay
  within the caller's project. The global admin sees both projects;
* no credential: 401 for the API, a redirect to the log-in page for portal
  pages (401 for their form posts), an answer for the public routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from appliance.identity.auth import PERMISSION_OPT, PORTAL_OPT, PUBLIC_OPT
from appliance.identity.roles import Permission, Role, role_allows
from tests.conftest import bearer
from tests.security.conftest import BASE_MODEL, OTHER, OWN, PASSWORD, World, error_of, jsonl

AUDIT_RANGE = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}


@dataclass
class Req:
    method: str
    path: str
    kw: dict[str, Any] = field(default_factory=dict)
    #: For a request that would change the other project: true while what it aimed at is unchanged.
    intact: Callable[[World], bool] | None = None


@dataclass
class Route:
    """How to call one route for the caller's own project and, if it reaches into projects, for the other."""

    own: Callable[[World], Req]
    other: Callable[[World], Req] | None = None
    #: ``hidden``: the other project's resource answers 404 like a missing one, audited.
    #: ``scoped``: the call succeeds but shows the caller's own project only (``scoped_ok`` says so).
    other_kind: Literal["hidden", "scoped"] = "hidden"
    scoped_ok: Callable[[World, Any], bool] | None = None


def _no_other_ids(w: World, resp) -> bool:
    return not any(s in resp.text for s in (w.files[OTHER], w.jobs[OTHER], w.adapters[OTHER], "marker-globex",
                                             "globex-secret"))


def _admin_get(w: World, path: str, **params):
    return w.client.get(path, headers=bearer(w.tokens[Role.ADMIN]), params=params)


def _count(w: World, what: str, project: str) -> int:
    if what == "files":
        return len(_admin_get(w, "/v1/files", project=project).json()["data"])
    return sum(j["organization_id"] == project for j in _admin_get(w, "/v1/fine_tuning/jobs", limit=100).json()["data"])


def _exists(path: str) -> Callable[[World], bool]:
    return lambda w: _admin_get(w, path).status_code == 200


def _status_is(job_id: str, status: str) -> Callable[[World], bool]:
    return lambda w: _admin_get(w, f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == status


def _other(build: Callable[[World], Req], adds_to: str) -> Callable[[World], Req]:
    """An other-project request that would add to its ``adds_to`` (files, jobs): intact while their count is."""

    def make(w: World) -> Req:
        before = _count(w, adds_to, OTHER)
        req = build(w)
        req.intact = lambda w2: _count(w2, adds_to, OTHER) == before
        return req

    return make


def _other_file(method: str, fmt: str, **kw) -> Callable[[World], Req]:
    """``fmt`` names ``{f}``, a fresh file of the other project (the global admin may really change it)."""

    def make(w: World) -> Req:
        f = w.upload(OTHER)
        extra = {k: {kk: (vv.format(f=f) if isinstance(vv, str) else vv) for kk, vv in v.items()}
                 for k, v in kw.items()}
        return Req(method, fmt.format(f=f), extra, intact=_exists(f"/v1/files/{f}"))

    return make


def _other_glossary(kw: dict[str, Any]) -> Callable[[World], Req]:
    def make(w: World) -> Req:
        path = f"/api/v1/projects/{OTHER}/glossary"
        before = _admin_get(w, path).json()["content_hash"]
        return Req("POST", path, kw, intact=lambda w2: _admin_get(w2, path).json()["content_hash"] == before)

    return make


def _other_job(method: str, fmt: str, status: str = "queued") -> Callable[[World], Req]:
    def make(w: World) -> Req:
        j = w.job(OTHER, status)
        return Req(method, fmt.format(j=j), intact=_status_is(j, status))

    return make


def _other_adapter(method: str, fmt: str) -> Callable[[World], Req]:
    def make(w: World) -> Req:
        a = w.adapter(OTHER)
        return Req(method, fmt.format(a=a), intact=_exists(f"/v1/models/{a}"))

    return make


def _upload_kw(project_header: str | None = None) -> dict[str, Any]:
    headers = {"OpenAI-Project": project_header} if project_header else {}
    return {"data": {"purpose": "fine-tune"}, "headers": headers,
            "files": {"file": ("matrix.jsonl", jsonl({"messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "hello"}]}))}}


def _chat(model: str) -> dict[str, Any]:
    return {"json": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}


def _policy_text(w: World) -> str:
    return w.state.files.policies.describe(w.state.identity.get_project(None, OWN)).text


def _evals_file(w: World, project: str) -> str:
    """The project's test file (purpose ``evals``), uploaded once."""
    key = f"evals:{project}"
    if key not in w.files:
        resp = w.client.post("/v1/files", headers=bearer(w.owner_token[project]), data={"purpose": "evals"},
                             files={"file": ("test.jsonl", jsonl({"messages": [
                                 {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))})
        assert resp.status_code == 201, resp.text
        w.files[key] = resp.json()["id"]
    return w.files[key]


def _evaluation(w: World, project: str, status: str = "queued") -> str:
    """An evaluation row as the API would create it (the runner is off: it never runs)."""
    from sqlalchemy import select

    from appliance.evaluations.models import Evaluation
    from appliance.evaluations.service import new_evaluation_id
    from appliance.identity.models import Project

    evaluation_id, file_id = new_evaluation_id(), _evals_file(w, project)
    with w.state.db.transaction() as s:
        project_id = s.scalar(select(Project.id).where(Project.name == project))
        s.add(Evaluation(id=evaluation_id, project_id=project_id, created_by="test", file=file_id,
                         models=[BASE_MODEL], base_model=BASE_MODEL, samples=1, max_tokens=8, status=status,
                         results=[]))
    return evaluation_id


def _evaluations_of(w: World, project: str) -> list[dict[str, Any]]:
    return [e for e in _admin_get(w, "/v1/evaluations", limit=100).json()["data"] if e["project"] == project]


def _other_evaluation_create(w: World, portal: bool = False) -> Req:
    before, file_id = len(_evaluations_of(w, OTHER)), _evals_file(w, OTHER)
    kw = ({"data": {"file": file_id, "model1": BASE_MODEL}} if portal else
          {"json": {"file": file_id, "models": [BASE_MODEL]}, "headers": {"OpenAI-Project": OTHER}})
    return Req("POST", "/evaluations" if portal else "/v1/evaluations", kw,
               intact=lambda w2: len(_evaluations_of(w2, OTHER)) == before)


def _other_evaluation_cancel(w: World, portal: bool = False) -> Req:
    e = _evaluation(w, OTHER)
    return Req("POST", f"{'' if portal else '/v1'}/evaluations/{e}/cancel",
               intact=lambda w2: _admin_get(w2, f"/v1/evaluations/{e}").json()["status"] == "queued")


G = lambda path, **kw: (lambda w: Req("GET", path, kw))  # noqa: E731 - a table of one-liners

#: Every route of the application, keyed "METHOD path" as Litestar spells the path.
ROUTES: dict[str, Route] = {
    # -- public and API description ---------------------------------------------------------
    "GET /health": Route(G("/health")),
    "GET /schema": Route(G("/schema")),
    "GET /schema/openapi.json": Route(G("/schema/openapi.json")),
    "GET /schema/{path:str}": Route(G("/schema/openapi.json")),
    "GET /static/{file_path:path}": Route(G("/static/portal.css")),
    "HEAD /static/{file_path:path}": Route(lambda w: Req("HEAD", "/static/portal.css")),
    # -- identity ---------------------------------------------------------------------------
    "GET /api/v1/me": Route(G("/api/v1/me")),
    "GET /api/v1/projects": Route(G("/api/v1/projects"), G("/api/v1/projects"), "scoped",
                                  lambda w, r: OTHER not in r.text),
    "POST /api/v1/projects": Route(lambda w: Req("POST", "/api/v1/projects", {"json": {"name": w.unique("p")}})),
    "GET /api/v1/projects/{name:str}": Route(G(f"/api/v1/projects/{OWN}"), G(f"/api/v1/projects/{OTHER}")),
    "GET /api/v1/projects/{name:str}/members": Route(G(f"/api/v1/projects/{OWN}/members"),
                                                     G(f"/api/v1/projects/{OTHER}/members")),
    "GET /api/v1/projects/{name:str}/policy": Route(G(f"/api/v1/projects/{OWN}/policy"),
                                                    G(f"/api/v1/projects/{OTHER}/policy")),
    "PUT /api/v1/projects/{name:str}/policy": Route(
        lambda w: Req("PUT", f"/api/v1/projects/{OWN}/policy", {"json": {"text": _policy_text(w)}}),
        lambda w: Req("PUT", f"/api/v1/projects/{OTHER}/policy", {"json": {"text": _policy_text(w)}})),
    "GET /api/v1/users": Route(G("/api/v1/users")),
    "POST /api/v1/users": Route(lambda w: Req("POST", "/api/v1/users", {"json": {"name": w.unique("u")}})),
    "POST /api/v1/users/{name:str}/roles": Route(lambda w: Req(
        "POST", f"/api/v1/users/{w.users[Role.CONSUMER]}/roles", {"json": {"role": "trainer", "project": OWN}})),
    "GET /api/v1/tokens": Route(G("/api/v1/tokens")),
    "POST /api/v1/tokens": Route(lambda w: Req("POST", "/api/v1/tokens", {"json": {
        "user": w.users[Role.CONSUMER], "role": "consumer", "project": OWN}})),
    "DELETE /api/v1/tokens/{token_id:str}": Route(lambda w: Req("DELETE", f"/api/v1/tokens/{w.token()[0]}")),
    # -- audit --------------------------------------------------------------------------------
    "GET /api/v1/audit/events": Route(G("/api/v1/audit/events", params={"limit": 1000}),
                                      G("/api/v1/audit/events", params={"limit": 1000}), "scoped",
                                      lambda w, r: {e["project"] for e in r.json()["data"]} <= {OWN}),
    "GET /api/v1/audit/verify": Route(G("/api/v1/audit/verify")),
    "POST /api/v1/audit/checkpoints": Route(lambda w: Req("POST", "/api/v1/audit/checkpoints")),
    "GET /api/v1/audit/proofs/inclusion": Route(G("/api/v1/audit/proofs/inclusion", params={"seq": 1})),
    "GET /api/v1/audit/proofs/consistency": Route(G("/api/v1/audit/proofs/consistency", params={"first": 1})),
    "GET /api/v1/audit/report": Route(G("/api/v1/audit/report", params=AUDIT_RANGE),
                                      G("/api/v1/audit/report", params={**AUDIT_RANGE, "project": OTHER}), "scoped",
                                      lambda w, r: r.json()["scope"]["project"] == OWN),
    # -- files --------------------------------------------------------------------------------
    "GET /v1/files": Route(G("/v1/files"), G("/v1/files", params={"project": OTHER})),
    "GET /api/v1/files/rejected": Route(G("/api/v1/files/rejected"), G("/api/v1/files/rejected"), "scoped",
                                        lambda w, r: OTHER not in r.text),
    "POST /v1/files": Route(lambda w: Req("POST", "/v1/files", _upload_kw(OWN)),
                            _other(lambda w: Req("POST", "/v1/files", _upload_kw(OTHER)),
                                   "files")),
    "GET /v1/files/{file_id:str}": Route(lambda w: Req("GET", f"/v1/files/{w.files[OWN]}"),
                                         lambda w: Req("GET", f"/v1/files/{w.files[OTHER]}")),
    "DELETE /v1/files/{file_id:str}": Route(lambda w: Req("DELETE", f"/v1/files/{w.upload(OWN)}"),
                                            _other_file("DELETE", "/v1/files/{f}")),
    "GET /v1/files/{file_id:str}/content": Route(lambda w: Req("GET", f"/v1/files/{w.files[OWN]}/content"),
                                                 lambda w: Req("GET", f"/v1/files/{w.files[OTHER]}/content")),
    "GET /v1/files/{file_id:str}/scan": Route(lambda w: Req("GET", f"/v1/files/{w.files[OWN]}/scan"),
                                              lambda w: Req("GET", f"/v1/files/{w.files[OTHER]}/scan")),
    "POST /v1/files/{file_id:str}/scan": Route(lambda w: Req("POST", f"/v1/files/{w.upload(OWN)}/scan"),
                                               _other_file("POST", "/v1/files/{f}/scan")),
    "GET /v1/files/{file_id:str}/quality": Route(lambda w: Req("GET", f"/v1/files/{w.files[OWN]}/quality"),
                                                 lambda w: Req("GET", f"/v1/files/{w.files[OTHER]}/quality")),
    "GET /api/v1/projects/{name:str}/glossary": Route(G(f"/api/v1/projects/{OWN}/glossary"),
                                                      G(f"/api/v1/projects/{OTHER}/glossary")),
    "POST /api/v1/projects/{name:str}/glossary": Route(
        lambda w: Req("POST", f"/api/v1/projects/{OWN}/glossary", {"json": {"values": ["Matrix Codename"]}}),
        _other_glossary({"json": {"values": ["Matrix Codename"]}})),
    "DELETE /api/v1/projects/{name:str}/glossary/{entry_id:str}": Route(
        lambda w: Req("DELETE", f"/api/v1/projects/{OWN}/glossary/gle_none"),
        lambda w: Req("DELETE", f"/api/v1/projects/{OTHER}/glossary/gle_none")),
    # -- models -------------------------------------------------------------------------------
    "GET /v1/model_imports": Route(G("/v1/model_imports")),
    "GET /v1/model_imports/{import_id:str}": Route(G("/v1/model_imports/modelimport-none")),
    "POST /v1/model_imports": Route(lambda w: Req("POST", "/v1/model_imports",
                                                  {"json": {"source": "none", "model": w.unique("m")}})),
    "GET /v1/models": Route(G("/v1/models"), G("/v1/models"), "scoped", _no_other_ids),
    "GET /v1/models/{model_id:str}": Route(lambda w: Req("GET", f"/v1/models/{w.adapters[OWN]}"),
                                           lambda w: Req("GET", f"/v1/models/{w.adapters[OTHER]}")),
    "DELETE /v1/models/{model_id:str}": Route(lambda w: Req("DELETE", f"/v1/models/{w.adapter(OWN)}"),
                                              _other_adapter("DELETE", "/v1/models/{a}")),
    # -- fine-tuning --------------------------------------------------------------------------
    "POST /v1/fine_tuning/jobs": Route(
        lambda w: Req("POST", "/v1/fine_tuning/jobs", {"json": {"model": BASE_MODEL, "training_file": w.files[OWN]},
                                                       "headers": {"OpenAI-Project": OWN}}),
        _other(lambda w: Req("POST", "/v1/fine_tuning/jobs", {"json": {
            "model": BASE_MODEL, "training_file": w.files[OTHER]}, "headers": {"OpenAI-Project": OTHER}}),
            "jobs")),
    "GET /v1/fine_tuning/jobs": Route(G("/v1/fine_tuning/jobs", params={"limit": 100}),
                                      G("/v1/fine_tuning/jobs", params={"limit": 100}), "scoped", _no_other_ids),
    "GET /v1/fine_tuning/jobs/{job_id:str}": Route(lambda w: Req("GET", f"/v1/fine_tuning/jobs/{w.jobs[OWN]}"),
                                                   lambda w: Req("GET", f"/v1/fine_tuning/jobs/{w.jobs[OTHER]}")),
    "POST /v1/fine_tuning/jobs/{job_id:str}/cancel": Route(
        lambda w: Req("POST", f"/v1/fine_tuning/jobs/{w.job(OWN)}/cancel"),
        _other_job("POST", "/v1/fine_tuning/jobs/{j}/cancel")),
    "POST /v1/fine_tuning/jobs/{job_id:str}/resume": Route(
        lambda w: Req("POST", f"/v1/fine_tuning/jobs/{w.job(OWN, 'cancelled')}/resume"),
        _other_job("POST", "/v1/fine_tuning/jobs/{j}/resume", "cancelled")),
    "GET /v1/fine_tuning/jobs/{job_id:str}/events": Route(
        lambda w: Req("GET", f"/v1/fine_tuning/jobs/{w.jobs[OWN]}/events"),
        lambda w: Req("GET", f"/v1/fine_tuning/jobs/{w.jobs[OTHER]}/events")),
    "GET /v1/fine_tuning/jobs/{job_id:str}/checkpoints": Route(
        lambda w: Req("GET", f"/v1/fine_tuning/jobs/{w.jobs[OWN]}/checkpoints"),
        lambda w: Req("GET", f"/v1/fine_tuning/jobs/{w.jobs[OTHER]}/checkpoints")),
    # -- inference (own: a model nobody has, so nothing is loaded; other: the other project's adapter) ----
    # -- evaluations (the runner is off: they stay queued) -------------------------------------------
    "POST /v1/evaluations": Route(
        lambda w: Req("POST", "/v1/evaluations", {"json": {"file": _evals_file(w, OWN), "models": [BASE_MODEL]},
                                                  "headers": {"OpenAI-Project": OWN}}),
        _other_evaluation_create),
    "GET /v1/evaluations": Route(
        G("/v1/evaluations", params={"limit": 100}), G("/v1/evaluations", params={"limit": 100}), "scoped",
        lambda w, resp: all(e["project"] == OWN for e in resp.json()["data"]) and _no_other_ids(w, resp)),
    "GET /v1/evaluations/{evaluation_id:str}": Route(
        lambda w: Req("GET", f"/v1/evaluations/{_evaluation(w, OWN)}"),
        lambda w: Req("GET", f"/v1/evaluations/{_evaluation(w, OTHER)}")),
    "POST /v1/evaluations/{evaluation_id:str}/cancel": Route(
        lambda w: Req("POST", f"/v1/evaluations/{_evaluation(w, OWN)}/cancel"), _other_evaluation_cancel),
    "POST /v1/chat/completions": Route(lambda w: Req("POST", "/v1/chat/completions", _chat("no-such-model")),
                                       lambda w: Req("POST", "/v1/chat/completions", _chat(w.adapters[OTHER]))),
    "POST /v1/completions": Route(
        lambda w: Req("POST", "/v1/completions", {"json": {"model": "no-such-model", "prompt": "hi"}}),
        lambda w: Req("POST", "/v1/completions", {"json": {"model": w.adapters[OTHER], "prompt": "hi"}})),
    "POST /v1/images/generations": Route(
        lambda w: Req("POST", "/v1/images/generations", {"json": {"model": "no-such-model", "prompt": "a cat"}}),
        lambda w: Req("POST", "/v1/images/generations", {"json": {"model": w.adapters[OTHER], "prompt": "a cat"}})),
    "POST /v1/load_lora_adapter": Route(lambda w: Req("POST", "/v1/load_lora_adapter", {"json": {
        "lora_name": "matrix", "lora_path": "/nonexistent/adapter"}})),
    "POST /v1/unload_lora_adapter": Route(lambda w: Req("POST", "/v1/unload_lora_adapter",
                                                        {"json": {"lora_name": "matrix"}})),
    "GET /v1/serving/replicas": Route(G("/v1/serving/replicas")),
    # -- portal (session cookie; form posts carry the CSRF token) ------------------------------
    "GET /login": Route(G("/login")),
    "POST /login": Route(lambda w: Req("POST", "/login", {
        "data": {"username": "web-consumer", "password": PASSWORD, "csrf_token": "x" * 32, "next": "/"},
        "headers": {"Cookie": "appliance_login_csrf=" + "x" * 32}})),
    "POST /logout": Route(lambda w: Req("POST", "/logout")),
    "POST /role": Route(lambda w: Req("POST", "/role", {"data": {"binding": "{binding}"}})),
    "GET /": Route(G("/")),
    "GET /datasets": Route(G("/datasets"), G("/datasets"), "scoped", _no_other_ids),
    "POST /datasets/upload": Route(
        lambda w: Req("POST", "/datasets/upload", {**_upload_kw(), "params": {"project": OWN}}),
        _other(lambda w: Req("POST", "/datasets/upload", {**_upload_kw(), "params": {"project": OTHER}}),
               "files")),
    "GET /datasets/{file_id:str}": Route(lambda w: Req("GET", f"/datasets/{w.files[OWN]}"),
                                         lambda w: Req("GET", f"/datasets/{w.files[OTHER]}")),
    "POST /datasets/{file_id:str}/review": Route(lambda w: Req("POST", f"/datasets/{w.upload(OWN)}/review"),
                                                 _other_file("POST", "/datasets/{f}/review")),
    "POST /datasets/{file_id:str}/delete": Route(
        lambda w: (lambda f: Req("POST", f"/datasets/{f}/delete", {"data": {"confirm": f}}))(w.upload(OWN)),
        _other_file("POST", "/datasets/{f}/delete", data={"confirm": "{f}"})),
    "GET /jobs": Route(G("/jobs"), G("/jobs"), "scoped", _no_other_ids),
    "POST /jobs": Route(
        lambda w: Req("POST", "/jobs", {"data": {"model": BASE_MODEL, "training_file": w.files[OWN]}}),
        _other(lambda w: Req("POST", "/jobs", {"data": {"model": BASE_MODEL, "training_file": w.files[OTHER]}}),
               "jobs")),
    "GET /jobs/new": Route(G("/jobs/new")),
    "GET /jobs/{job_id:str}": Route(lambda w: Req("GET", f"/jobs/{w.jobs[OWN]}"),
                                    lambda w: Req("GET", f"/jobs/{w.jobs[OTHER]}")),
    "GET /jobs/{job_id:str}/results/{file_id:str}": Route(
        lambda w: Req("GET", f"/jobs/{w.jobs[OWN]}/results/file-none"),
        lambda w: Req("GET", f"/jobs/{w.jobs[OTHER]}/results/file-none")),
    "POST /jobs/{job_id:str}/cancel": Route(lambda w: Req("POST", f"/jobs/{w.job(OWN)}/cancel"),
                                            _other_job("POST", "/jobs/{j}/cancel")),
    "POST /jobs/{job_id:str}/resume": Route(lambda w: Req("POST", f"/jobs/{w.job(OWN, 'cancelled')}/resume"),
                                            _other_job("POST", "/jobs/{j}/resume", "cancelled")),
    "GET /evaluations": Route(G("/evaluations"), G("/evaluations"), "scoped", lambda w, resp: _no_other_ids(w, resp) and not any(
        e["id"] in resp.text or e["file"] in resp.text for e in _evaluations_of(w, OTHER))),
    "POST /evaluations": Route(
        lambda w: Req("POST", "/evaluations", {"data": {"file": _evals_file(w, OWN), "model1": BASE_MODEL}}),
        lambda w: _other_evaluation_create(w, portal=True)),
    "GET /evaluations/{evaluation_id:str}": Route(lambda w: Req("GET", f"/evaluations/{_evaluation(w, OWN)}"),
                                                  lambda w: Req("GET", f"/evaluations/{_evaluation(w, OTHER)}")),
    "POST /evaluations/{evaluation_id:str}/cancel": Route(
        lambda w: Req("POST", f"/evaluations/{_evaluation(w, OWN)}/cancel"),
        lambda w: _other_evaluation_cancel(w, portal=True)),
    "GET /models": Route(G("/models"), G("/models"), "scoped", _no_other_ids),
    "GET /audit": Route(G("/audit")),
    "GET /audit/export/{fmt:str}": Route(G("/audit/export/json"), G("/audit/export/json"), "scoped",
                                         lambda w, r: {e["project"] for e in r.json()} <= {OWN}),
    "GET /audit/report": Route(G("/audit/report?from=2026-01-01&to=2100-01-01&format=json"),
                               G("/audit/report?from=2026-01-01&to=2100-01-01&format=json"), "scoped",
                               lambda w, r: {d["project"] for d in r.json()["datasets"]} <= {OWN}),
    "GET /admin": Route(G("/admin")),
    "POST /admin": Route(lambda w: Req("POST", "/admin", {"data": {"action": "create_project",
                                                                   "name": w.unique("p")}})),
    "GET /playground": Route(G("/playground")),
    "GET /playground/images": Route(G("/playground/images")),
    "POST /playground/images": Route(
        lambda w: Req("POST", "/playground/images", {"data": {"model": "no-such-model", "prompt": "a cat"}}),
        lambda w: Req("POST", "/playground/images", {"data": {"model": w.adapters[OTHER], "prompt": "a cat"}})),
    "POST /playground/chat": Route(lambda w: Req("POST", "/playground/chat", _chat("no-such-model")),
                                   lambda w: Req("POST", "/playground/chat", _chat(w.adapters[OTHER]))),
}


def app_routes(app) -> dict[str, Any]:
    """``"METHOD path"`` -> handler for every route the application serves (automatic OPTIONS aside)."""
    out = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            for method in handler.http_methods:
                if method == "OPTIONS" and handler.handler_name == "options_handler":
                    continue  # Litestar's own, answered by the permission guard like the route
                out[f"{method} {route.path}"] = handler
    return out


def test_every_route_is_classified(world):
    served = app_routes(world.client.app)
    unclassified = sorted(set(served) - set(ROUTES))
    assert not unclassified, (f"routes without an entry in {__name__}.ROUTES (say how to call them, and for "
                              f"the other project if they reach into one): {unclassified}")
    assert not sorted(set(ROUTES) - set(served)), "ROUTES names routes the application no longer serves"


def _expected(handler) -> Callable[[Role], bool]:
    if handler.opt.get(PUBLIC_OPT):
        return lambda role: True
    declared = handler.opt.get(PERMISSION_OPT)
    if declared is None:
        if handler.opt.get(PORTAL_OPT):
            return lambda role: True  # start page, log-out, role switch: any logged-in user
        declared = Permission.SCHEMA_READ  # the OpenAPI routes (see permission_guard)
    return lambda role: role_allows(role, Permission(declared))


class Caller:
    """One role's credential for API or portal requests."""

    def __init__(self, world: World, role: Role | None, portal: bool) -> None:
        self.world, self.role, self.portal = world, role, portal
        self._session = None

    @property
    def user(self) -> str | None:
        if self.role is None:
            return None
        return f"web-{self.role.value}" if self.portal else self.world.users[self.role]

    def send(self, req: Req):
        kw = {k: v for k, v in req.kw.items()}
        headers = dict(kw.pop("headers", {}))
        if self.role is not None and self.portal:
            session = self.world.session(self.role) if req.path == "/logout" else self._get_session()
            headers.update(session.headers())
            if "data" in kw:
                kw["data"] = {k: (str(session.binding) if v == "{binding}" else v) for k, v in kw["data"].items()}
        elif self.role is not None:
            headers.update(bearer(self.world.tokens[self.role]))
        return self.world.client.request(req.method, req.path, headers=headers, follow_redirects=False, **kw)

    def _get_session(self):
        if self._session is None:
            self._session = self.world.session(self.role)
        return self._session


def _check_denied(w: World, caller: Caller, resp, what: str) -> list[str]:
    if resp.status_code != 403:
        return [f"{what}: expected 403, got {resp.status_code} {resp.text[:200]}"]
    problems = []
    try:
        error_of(resp, 403, "permission_denied")
    except AssertionError as exc:
        problems.append(f"{what}: 403 not in the error shape: {exc}")
    events = w.events(resp.headers.get("x-request-id"), "access.denied")
    if not events or events[0].actor != caller.user or events[0].outcome != "denied":
        problems.append(f"{what}: the denial was not audited for {caller.user}")
    return problems


@pytest.mark.parametrize("key", sorted(ROUTES))
def test_access_matrix(world, key):
    served = app_routes(world.client.app)
    if key not in served:
        pytest.fail(f"{key} is no longer served (see test_every_route_is_classified)")
    handler, route = served[key], ROUTES[key]
    allows = _expected(handler)
    portal = bool(handler.opt.get(PORTAL_OPT))
    public = bool(handler.opt.get(PUBLIC_OPT))
    problems: list[str] = []

    # No credential at all.
    resp = Caller(world, None, portal).send(route.own(world))
    if public:
        if resp.status_code in (401, 403) or resp.status_code >= 500:
            problems.append(f"anonymous: public route answered {resp.status_code}")
    elif portal and route.own(world).method in ("GET", "HEAD"):
        if resp.status_code != 303 or not resp.headers.get("location", "").startswith("/login"):
            problems.append(f"anonymous: expected a redirect to /login, got {resp.status_code}")
    else:
        try:
            error_of(resp, 401, "login_required" if portal else "token_missing")
        except AssertionError as exc:
            problems.append(f"anonymous: {exc}")

    for role in Role:
        caller = Caller(world, role, portal)
        allowed = allows(role)
        what = f"{role.value} @ {'all projects' if role is Role.ADMIN else OWN}"
        # Own project.
        resp = caller.send(route.own(world))
        if allowed and (resp.status_code in (401, 403) or resp.status_code == 500):
            problems.append(f"{what}: allowed, but got {resp.status_code} {resp.text[:300]}")
        if not allowed:
            problems += _check_denied(world, caller, resp, what)
        # The other project.
        if route.other is None:
            continue
        req = route.other(world)
        resp = caller.send(req)
        what = f"{what} -> {OTHER}"
        if not allowed:
            problems += _check_denied(world, caller, resp, what)
        elif role is Role.ADMIN:
            # 502: the base model has no files here (the matrix never loads one); access was granted.
            if resp.status_code in (401, 403) or resp.status_code == 500:
                problems.append(f"{what}: the global admin got {resp.status_code} {resp.text[:300]}")
        elif route.other_kind == "scoped":
            if resp.status_code != 200 or not route.scoped_ok(world, resp):
                problems.append(f"{what}: expected only {OWN}'s data, got {resp.status_code} {resp.text[:300]}")
        else:
            if resp.status_code != 404:
                problems.append(f"{what}: expected 404 as for a missing resource, got {resp.status_code} "
                                f"{resp.text[:300]}")
            elif not portal or "text/html" not in resp.headers.get("content-type", ""):
                try:
                    error_of(resp, 404, "not_found")
                except AssertionError as exc:
                    problems.append(f"{what}: 404 not in the error shape: {exc}")
            if any(s in resp.text for s in ("marker-globex", "globex-secret")):
                problems.append(f"{what}: the 404 carries the other project's data")
            if not world.events(resp.headers.get("x-request-id"), "access.denied"):
                problems.append(f"{what}: the cross-project attempt was not audited")
        if req.intact is not None and role is not Role.ADMIN and not req.intact(world):
            problems.append(f"{what}: the other project's data was changed")
    assert not problems, f"{key}:\n  " + "\n  ".join(problems)
