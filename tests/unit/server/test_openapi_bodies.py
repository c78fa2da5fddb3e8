"""Every request body in the OpenAPI documents is typed: a schema with properties, not a bare object."""

from __future__ import annotations

import inspect

from litestar.handlers import HTTPRouteHandler

from tests.conftest import bearer

WRITES = ("post", "put", "patch")
#: What a handler that reads its body itself calls (it must then declare the body: ``operation(body=...)``).
RAW_READS = ("request.body()", "request.json()", "request.form()", "request.stream()")


def _resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _untyped(doc: dict, schema: dict) -> bool:
    """A free-form object (``{"type": "object"}``, maybe ``additionalProperties``) with no properties."""
    schema = _resolve(doc, schema)
    if any(key in schema for key in ("oneOf", "anyOf", "allOf")):
        alternatives = schema.get("oneOf", []) + schema.get("anyOf", []) + schema.get("allOf", [])
        return any(_untyped(doc, s) for s in alternatives)
    return not schema.get("properties")


def body_offenders(doc: dict) -> list[str]:
    """Operations whose request body is missing a schema or is an object with no declared fields."""
    offenders = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in WRITES or "requestBody" not in op:
                continue
            content = op["requestBody"].get("content") or {}
            if not content:
                offenders.append(f"{method.upper()} {path}: no media type")
            for media, spec in content.items():
                if "schema" not in spec or _untyped(doc, spec["schema"]):
                    offenders.append(f"{method.upper()} {path} ({media}): free-form body")
    return offenders


def undeclared_raw_bodies(app, doc: dict) -> list[str]:
    """Handlers that read their body themselves but whose operation declares no request body."""
    offenders = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if not isinstance(handler, HTTPRouteHandler) or not handler.resolve_include_in_schema():
                continue
            fn = getattr(handler.fn, "func", handler.fn)  # sync handlers are wrapped to run in a thread
            try:
                source = inspect.getsource(fn)
            except (OSError, TypeError):  # e.g. the automatic OPTIONS handlers
                continue
            for method in handler.http_methods:
                op = doc["paths"].get(route.path, {}).get(method.lower())
                if method.lower() in WRITES and op is not None and "requestBody" not in op \
                        and any(read in source for read in RAW_READS):
                    offenders.append(f"{method} {route.path}")
    return offenders


def test_every_request_body_of_the_api_is_typed(client, admin_token):
    doc = client.get("/schema/openapi.json", headers=bearer(admin_token)).json()
    assert body_offenders(doc) == []
    assert undeclared_raw_bodies(client.app, doc) == []
    # The bodies the routes once took as `dict[str, Any]`, by name.
    ops = doc["paths"]
    for path, component in [("/v1/fine_tuning/jobs", "JobCreate"),
                            ("/v1/chat/completions", "ChatCompletionRequest"),
                            ("/v1/completions", "CompletionRequest"),
                            ("/v1/images/generations", "ImageGenerationRequest"),
                            ("/v1/load_lora_adapter", "LoadLoraAdapterRequest"),
                            ("/v1/unload_lora_adapter", "UnloadLoraAdapterRequest")]:
        schema = ops[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{component}"}, (path, schema)
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"} and "ignored_fields" not in chat["properties"]
    assert {"temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "stream", "seed"} \
        <= set(chat["properties"])
    job = doc["components"]["schemas"]["JobCreate"]
    assert set(job["required"]) == {"model", "training_file"}
    assert {"validation_file", "suffix", "seed", "method", "hyperparameters", "memorization", "compute"} \
        <= set(job["properties"])


def test_the_checks_catch_a_free_form_body():
    def body(schema):
        return {"requestBody": {"content": {"application/json": {"schema": schema}}}}

    doc = {"paths": {"/x": {"post": body({"type": "object", "additionalProperties": {}})},
                     "/y": {"put": body({"$ref": "#/components/schemas/Y"})},
                     "/z": {"patch": body({"$ref": "#/components/schemas/Z"})}},
           "components": {"schemas": {"Y": {"type": "object"}, "Z": {"type": "object", "properties": {"a": {}}}}}}
    assert body_offenders(doc) == ["POST /x (application/json): free-form body",
                                   "PUT /y (application/json): free-form body"]


def test_the_stand_in_vllm_server_documents_its_bodies():
    from litestar.testing import TestClient

    from serving.vllm_server import create_vllm_compatible_app

    class _Engine:
        base_model_name, max_context = "tiny", 64

        def adapters(self):
            return []

    app = create_vllm_compatible_app(_Engine())
    with TestClient(app) as stand_in:
        doc = stand_in.get("/schema/openapi.json").json()
    assert body_offenders(doc) == []
    assert undeclared_raw_bodies(app, doc) == []
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/chat/completions", "/v1/completions"):
        assert "requestBody" in doc["paths"][path]["post"], path
    assert set(doc["components"]["schemas"]["LoadLoraAdapterRequest"]["required"]) == {"lora_name", "lora_path"}
