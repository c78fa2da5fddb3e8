"""What fuzzing the API found, pinned as plain tests (quick, no schemathesis needed)."""

from __future__ import annotations

import pytest

from appliance.identity.roles import Role
from tests.conftest import bearer
from tests.security.conftest import error_of


def test_options_lists_every_method_of_the_path(client, admin_token):
    """Litestar 2 kept the first handler's OPTIONS answer (litestar#4169): `Allow` missed POST on /v1/files."""
    h = bearer(admin_token)
    assert client.options("/v1/files", headers=h).headers["allow"] == "GET, OPTIONS, POST"
    assert client.options("/v1/files/file-x", headers=h).headers["allow"] == "DELETE, GET, OPTIONS"
    assert client.options("/v1/models/m", headers=h).headers["allow"] == "DELETE, GET, OPTIONS"


@pytest.mark.parametrize(("path", "params", "param"), [
    # A number was taken for a Unix time; the schema promises RFC 3339.
    ("/api/v1/audit/events", {"until": "0.5"}, "until"),
    ("/api/v1/audit/report", {"from": "1", "to": "2026-01-01T00:00:00Z"}, "from"),
    # Past SQLite's 64-bit INTEGER: an OverflowError in the driver, answered 500.
    ("/api/v1/audit/events", {"after": str(2**70)}, "after"),
    # A tree larger than the log: a ValueError in the Merkle code, answered 500.
    ("/api/v1/audit/proofs/consistency", {"first": 5000, "second": 7000000}, "second"),
    ("/api/v1/audit/proofs/inclusion", {"seq": 5000, "tree_size": 7000000}, "tree_size"),
])
def test_bad_audit_parameters_are_400_naming_the_parameter(client, admin_token, path, params, param):
    err = error_of(client.get(path, headers=bearer(admin_token), params=params), 400, "invalid_request")
    assert err["param"] == param


def test_every_error_the_schema_declares_is_in_the_error_shape(client, admin_token):
    schema = client.get("/schema/openapi.json", headers=bearer(admin_token)).json()
    assert schema["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    assert schema["paths"]["/health"]["get"]["security"] == [{}]
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            declared = {s for s in op["responses"] if s >= "400"}
            assert "500" in declared, (method, path)
            if path != "/health":
                assert {"400", "401", "403", "404", "429"} <= declared, (method, path)
            for status in declared:
                content = op["responses"][status]["content"]["application/json"]["schema"]
                refs = [content.get("$ref")] + [s.get("$ref") for s in content.get("oneOf", [])]
                assert "#/components/schemas/ErrorBody" in refs, (method, path, status, content)
    assert schema["paths"]["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"].keys() == {
        "application/octet-stream"}


def test_a_base_model_without_files_is_an_engine_error_not_a_500(client, state, make_token):
    """The loader took the missing directory for a hub repository id and raised a validation error."""
    from appliance.catalog.models import BaseModelRecord

    with state.db.transaction() as s:
        s.add(BaseModelRecord(name="gone", kind="llm", path=str(state.settings.models_dir / "gone"),
                              content_hash="sha256:0", architecture="LlamaForCausalLM", parameters=1,
                              imported_by="test"))
    consumer = make_token("carl", Role.CONSUMER, "acme")
    resp = client.post("/v1/chat/completions", headers=bearer(consumer),
                       json={"model": "gone", "messages": [{"role": "user", "content": "hi"}]})
    err = error_of(resp, 502, "engine_error")
    assert "appliance models import" in err["message"] and err["param"] == "model"
