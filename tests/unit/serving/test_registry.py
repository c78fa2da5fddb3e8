"""The engine registry, the engine protocols, and how the serving errors are answered."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from serving import registry
from serving.engine import Engine, ImageEngine, TextEngine
from serving.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    ConflictError,
    EngineError,
    InvalidRequestError,
    NoReplicaError,
    NotFoundError,
    ServingError,
    error_body,
    model_not_found,
)
from serving.registry import EngineSpec, create_engine, engine_kinds, register_engine


class _StubEngine:
    """The common lifecycle and nothing else."""

    base_model_name = "stub"

    def load_adapter(self, name, files=None, *, replace=False): ...

    def unload_adapter(self, name): ...

    def adapters(self):
        return []

    def has_adapter(self, name):
        return False

    def close(self): ...


def _has_members(engine: object, protocol: type) -> bool:
    """What isinstance() checks of a protocol, looked up on the class (no property is evaluated)."""
    members = {m for cls in protocol.__mro__ if cls.__module__ == "serving.engine"
               for m in (*vars(cls), *getattr(cls, "__annotations__", {}))
               if not m.startswith("_")}
    return all(hasattr(type(engine), m) or m in getattr(type(engine), "__annotations__", {}) for m in members)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test do not outlive it."""
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))


def test_the_three_engines_are_registered():
    assert {"transformers", "vllm", "diffusers"} <= set(engine_kinds())


def test_an_unknown_kind_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="no engine kind 'nope'; registered: .*transformers"):
        create_engine("nope", EngineSpec("/nowhere"))


def test_a_kind_is_registered_once_unless_replaced(scratch_registry):
    @register_engine("stub")
    def stub(spec: EngineSpec) -> Engine:
        engine = _StubEngine()
        engine.base_model_name = spec.base_name
        return engine

    engine = create_engine("stub", EngineSpec(Path("/models/tiny")))
    assert isinstance(engine, Engine) and engine.base_model_name == "tiny"
    assert not isinstance(engine, TextEngine) and not isinstance(engine, ImageEngine)
    assert _has_members(engine, Engine) and not _has_members(engine, TextEngine)
    with pytest.raises(ValueError, match="already registered"):
        register_engine("stub", stub)
    register_engine("stub", lambda spec: _StubEngine(), replace=True)
    assert create_engine("stub", EngineSpec("/m", name="x")).base_model_name == "stub"


def test_a_factory_returning_no_engine_is_an_error(scratch_registry):
    register_engine("broken", lambda spec: object())
    with pytest.raises(TypeError, match="does not implement serving.engine.Engine"):
        create_engine("broken", EngineSpec("/m"))


def test_transformers_from_the_registry_is_a_text_engine(tiny_parts, tmp_path):
    model, tokenizer = tiny_parts
    copy.deepcopy(model).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    engine = create_engine("transformers", EngineSpec(tmp_path / "tiny", device="cpu", max_resident_adapters=3))
    try:
        assert isinstance(engine, TextEngine) and isinstance(engine, Engine)
        assert engine.base_model_name == "tiny"
        assert engine.config.max_resident_adapters == 3
    finally:
        engine.close()


def test_vllm_from_the_registry_is_a_text_engine_reading_its_key_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("secret-token\n")
    engine = create_engine("vllm", EngineSpec(tmp_path, name="base", replica_urls=["http://127.0.0.1:9"],
                                              shm_dir=tmp_path, api_key_file=key, max_resident_adapters=2))
    try:
        # Not isinstance(engine, TextEngine): before Python 3.12 it reads ``max_context``, which asks a replica.
        assert isinstance(engine, Engine) and _has_members(engine, TextEngine)
        assert engine.base_model_name == "base"
        assert hasattr(engine, "reconcile")  # what InferenceService checks before reconciling replicas
    finally:
        engine.close()


def test_diffusers_from_the_registry_is_an_image_engine(tmp_path):
    from appliance.diffusion import build_tiny_sd_pipeline

    model_dir = build_tiny_sd_pipeline(tmp_path / "tiny-sd", seed=0)
    engine = create_engine("diffusers", EngineSpec(model_dir, device="cpu", max_resident_adapters=2))
    try:
        assert isinstance(engine, ImageEngine) and isinstance(engine, Engine)
        assert not isinstance(engine, TextEngine)
        assert engine.base_model_name == "tiny-sd"
        assert engine.config.max_resident_adapters == 2
    finally:
        engine.close()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("exc, status, type_, code", [
    (InvalidRequestError("bad", param="n"), 400, "invalid_request_error", "invalid_request"),
    (NotFoundError("gone"), 404, "not_found_error", "not_found"),
    (model_not_found("ghost"), 404, "not_found_error", "model_not_found"),
    (ConflictError("taken", param="name"), 409, "conflict_error", "conflict"),
    (AdapterLoadError("broken", param="name"), 400, "invalid_request_error", "adapter_load_failed"),
    (EngineError("down"), 502, "server_error", "engine_error"),
    (NoReplicaError("none up"), 503, "server_error", "no_replica_available"),
    (ServingError("odd"), 500, "server_error", "error"),
])
def test_the_control_plane_answers_serving_errors_as_before(exc, status, type_, code):
    from appliance.web.errors import body_of

    assert body_of(exc) == (status, {"error": {"code": code, "message": exc.message, "param": exc.param,
                                               "type": type_}})


def test_the_appliance_tree_is_the_serving_tree():
    from appliance import errors

    assert errors.ApplianceError is ServingError
    assert errors.InvalidRequestError is InvalidRequestError and errors.NotFoundError is NotFoundError
    assert issubclass(AdapterNotFoundError, errors.NotFoundError)
    assert issubclass(errors.PolicyViolationError, InvalidRequestError)


def test_messages_and_bodies_are_scrubbed():
    exc = InvalidRequestError("got Bearer abcdefgh12345678 in the prompt")
    assert "abcdefgh12345678" not in exc.message
    assert "abcdefgh12345678" not in error_body(400, "Bearer abcdefgh12345678", None, "BadRequestError")[
        "error"]["message"]
