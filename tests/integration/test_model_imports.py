"""``/v1/model_imports``: an admin imports a base model from the import directory and follows it."""

from __future__ import annotations

import time

from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.roles import Role
from appliance.modelstore import build_tiny_causal_lm
from tests.conftest import bearer


def _audit(state, action: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def _finished(client, token: str, import_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/model_imports/{import_id}", headers=bearer(token)).json()
        if body["status"] != "running":
            return body
        time.sleep(0.2)
    raise AssertionError(f"import {import_id} still running after {timeout} s")


def test_an_admin_imports_a_sharded_model_from_the_import_directory_and_follows_it(client, state, admin_token):
    imports = state.settings.home.imports_dir
    build_tiny_causal_lm(imports / "acme-llm", seed=3)
    from transformers import AutoModelForCausalLM

    # As checkpoints ship: several safetensors shards and their index.
    model = AutoModelForCausalLM.from_pretrained(imports / "acme-llm", local_files_only=True)
    for f in (imports / "acme-llm").glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(imports / "acme-llm", max_shard_size="200KB")
    shards = sorted(p.name for p in (imports / "acme-llm").glob("model-*.safetensors"))
    assert len(shards) >= 2
    (imports / "acme-llm" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# acme-llm\n")  # its card

    created = client.post("/v1/model_imports", headers=bearer(admin_token),
                          json={"source": "acme-llm", "model": "acme-llm-1"})
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["object"] == "model.import" and body["model"] == "acme-llm-1" and body["source"] == "acme-llm"
    done = _finished(client, admin_token, body["id"])
    assert done["status"] == "succeeded", done["error"]
    messages = [e["message"] for e in done["events"]]
    assert any(m.startswith("copying ") for m in messages)
    assert all(any(f"copied {shard}" in m for m in messages) for shard in shards)  # progress per weight file
    assert any("checking the weights" in m for m in messages)
    models = client.get("/v1/models", headers=bearer(admin_token)).json()["data"]
    assert "acme-llm-1" in [m["id"] for m in models]
    card = client.get("/v1/models/acme-llm-1", headers=bearer(admin_token)).json()
    assert card["license"] == "apache-2.0" and card["max_model_len"] == 512  # from its model card and config
    assert card["parameters"] > 0 and card["size_bytes"] > 0
    listed = client.get("/v1/model_imports", headers=bearer(admin_token)).json()["data"]
    assert [i["id"] for i in listed] == [body["id"]]
    [asked] = _audit(state, "model.import.request")
    [imported] = _audit(state, "model.import")
    assert asked.resource_id == imported.resource_id == "acme-llm-1" and imported.outcome == "success"
    assert asked.details["import_id"] == body["id"] and asked.actor == imported.actor

    again = client.post("/v1/model_imports", headers=bearer(admin_token),
                        json={"source": "acme-llm", "model": "acme-llm-1"})
    assert again.status_code == 409 and again.json()["error"]["param"] == "model"


def test_a_broken_model_ends_failed_naming_the_problem_and_is_audited(client, state, admin_token):
    broken = state.settings.home.imports_dir / "broken"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"not really")
    body = client.post("/v1/model_imports", headers=bearer(admin_token),
                       json={"source": "broken", "model": "broken-1"}).json()
    done = _finished(client, admin_token, body["id"])
    assert done["status"] == "failed" and done["finished_at"] is not None
    assert done["error"]["param"] == "source" and "config.json" in done["error"]["message"]
    [failure] = _audit(state, "model.import")
    assert failure.outcome == "failure" and failure.resource_id == "broken-1"
    assert not (state.settings.models_dir / "broken-1").exists()
    assert "broken-1" not in [m["id"] for m in client.get("/v1/models", headers=bearer(admin_token)).json()["data"]]


def test_sources_outside_the_import_directory_and_bad_bodies_are_refused(client, state, admin_token, tmp_path):
    imports = state.settings.home.imports_dir
    imports.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (imports / "link-out").symlink_to(outside)
    cases = [
        ({"source": "../elsewhere", "model": "m"}, 400, "source"),
        ({"source": str(outside), "model": "m"}, 400, "source"),
        ({"source": "link-out", "model": "m"}, 400, "source"),
        ({"source": "not-there", "model": "m"}, 404, "source"),
        ({"source": "", "model": "m"}, 400, "source"),
        ({"source": "a\u0000b", "model": "m"}, 400, "source"),
        ({"source": "x" * 5000, "model": "m"}, 400, "source"),
        ({"source": "x", "model": "bad name!"}, 400, "model"),
        ({"source": "x", "model": 3}, 400, "model"),
        ({"source": "x", "model": "m", "path": "/etc"}, 400, "path"),
    ]
    for body, status, param in cases:
        got = client.post("/v1/model_imports", headers=bearer(admin_token), json=body)
        assert got.status_code == status, (body, got.text)
        assert got.json()["error"]["param"] == param, (body, got.text)
    assert client.get("/v1/model_imports/modelimport-nope", headers=bearer(admin_token)).status_code == 404
    assert client.get("/v1/model_imports", headers=bearer(admin_token)).json()["data"] == []


def test_only_an_admin_may_import_and_a_refusal_is_audited(client, state, make_token):
    trainer = make_token("trish", Role.TRAINER, "acme")
    got = client.post("/v1/model_imports", headers=bearer(trainer), json={"source": "x", "model": "m"})
    assert got.status_code == 403
    assert client.get("/v1/model_imports", headers=bearer(trainer)).status_code == 403
    denied = [e for e in _audit(state, "access.denied") if e.actor == "trish"]
    assert denied and all(e.outcome == "denied" for e in denied)


def test_single_file_checkpoints_are_converted_or_refused_naming_what_was_expected(client, state, admin_token,
                                                                                   tmp_path):
    """A pickled checkpoint is refused unopened; a Stable Diffusion file that does not fit the shipped configs of
    its detected family (the tiny one here: detected as SD 1.x) fails naming the family and what was expected;
    both are audited and leave nothing in the store. (Conversion itself: tests/unit/diffusion/test_single_file.py.)"""
    from tests.unit.diffusion.ldm_export import export_single_file
    from tests.unit.diffusion.test_single_file import sd_structured

    imports = state.settings.home.imports_dir
    imports.mkdir(parents=True, exist_ok=True)
    (imports / "old.ckpt").write_bytes(b"PK\x03\x04 a pickle")
    export_single_file(sd_structured(tmp_path, xl=False), imports / "tiny-sd15.safetensors", xl=False)
    for source, name, message in [("old.ckpt", "old-1", "pickled checkpoint"),
                                  ("tiny-sd15.safetensors", "tiny-1", "could not be converted as a "
                                                                      "StableDiffusionPipeline")]:
        body = client.post("/v1/model_imports", headers=bearer(admin_token),
                           json={"source": source, "model": name}).json()
        done = _finished(client, admin_token, body["id"])
        assert done["status"] == "failed" and done["error"]["param"] == "source", done
        assert message in done["error"]["message"] and "single-file Stable Diffusion 1.x, 2.x or SDXL" in \
            done["error"]["message"]
        assert not (state.settings.models_dir / name).exists()
    failures = [e for e in _audit(state, "model.import") if e.outcome == "failure"]
    assert {e.resource_id for e in failures} == {"old-1", "tiny-1"}
    assert not any(p.name.startswith(".single-file-") for p in state.settings.models_dir.iterdir())
