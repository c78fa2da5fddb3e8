"""Chat and completions through the official openai client, hot-load, isolation, audit, vLLM client."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.models import Project
from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer

BASE = "tiny-llama"


@pytest.fixture
def tiny(state, tmp_path) -> Path:
    from appliance.modelstore import build_tiny_causal_lm

    src = build_tiny_causal_lm(tmp_path / "tiny-src", seed=0)
    state.catalog.import_model(CLI_CTX, src, BASE)
    return Path(state.catalog.get_base_model(BASE).path)


def random_lora(model_dir: Path, seed: int, scale: float = 30.0) -> dict[str, bytes]:
    """A LoRA with non-zero B so it visibly steers the tiny model (saved PEFT files)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    config = json.loads(files["adapter_config.json"])
    config["base_model_name_or_path"] = BASE
    files["adapter_config.json"] = json.dumps(config).encode()
    return files


def publish(state, project_name: str, files: dict[str, bytes], tag: str) -> str:
    """Publish an adapter as a finished job would (catalogue + hot-load hooks)."""
    job_id = f"ftjob-test{tag}"
    adapter_id = f"ft:{BASE}:{project_name}:{tag}:{job_id}"
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == project_name))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=job_id, project=project, base_model=BASE,
                              kind="lora", files=files, manifest={"job_id": job_id, "test": True})
    for hook in state.catalog.on_publish:
        hook(adapter_id)
    return adapter_id


def api_for(client, token) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)


@pytest.fixture
def consumer(make_token) -> str:
    return make_token("carl", Role.CONSUMER, "acme")


def ask(api, model: str, text: str = "Hello there", **kw):
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=12,
                                       temperature=0, **kw)


def test_chat_streamed_and_not_with_base_and_adapter(client, state, tiny, consumer):
    api = api_for(client, consumer)
    base = ask(api, BASE)
    assert base.object == "chat.completion" and base.choices[0].message.role == "assistant"
    assert base.usage.completion_tokens > 0 and base.usage.total_tokens == base.usage.prompt_tokens + \
        base.usage.completion_tokens
    adapter = publish(state, "acme", random_lora(tiny, seed=1), "a1")
    ids = {m.id: m for m in api.models.list().data}
    assert BASE in ids and ids[adapter].model_extra["parent"] == BASE
    tuned = ask(api, adapter)
    assert tuned.choices[0].message.content != base.choices[0].message.content
    chunks = list(ask(api, adapter, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == tuned.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tuned.usage.completion_tokens
    raw = client.post("/v1/chat/completions", headers=bearer(consumer), json={
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4})
    assert raw.text.rstrip().endswith("data: [DONE]")
    completion = api.completions.create(model=adapter, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert completion.object == "text_completion" and completion.choices[0].text


def test_requests_are_audited_as_metadata_only(client, state, tiny, consumer):
    api = api_for(client, consumer)
    secret_prompt = "my private prompt 7f3k"
    ask(api, BASE, secret_prompt)
    list(ask(api, BASE, secret_prompt, stream=True))
    with state.db.read() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "inference.chat")))
    assert len(events) == 2
    for e in events:
        assert e.actor == "carl" and e.resource_id == BASE and e.project == "acme"
        assert e.details["completion_tokens"] > 0 and e.details["latency_ms"] > 0
        assert secret_prompt not in json.dumps(e.details)
    assert {e.details["stream"] for e in events} == {True, False}


def test_another_projects_model_is_404_and_roles_are_checked(client, state, tiny, consumer, make_token):
    adapter = publish(state, "acme", random_lora(tiny, seed=2), "a2")
    other = api_for(client, make_token("gwen", Role.CONSUMER, "globex"))
    with pytest.raises(openai.NotFoundError):
        ask(other, adapter)
    assert adapter not in [m.id for m in other.models.list().data]
    with pytest.raises(openai.NotFoundError):
        ask(other, "no-such-model")
    owner = api_for(client, make_token("dora", Role.DATA_OWNER, "acme"))
    with pytest.raises(openai.PermissionDeniedError):
        ask(owner, BASE)
    with pytest.raises(openai.BadRequestError) as info:
        api_for(client, consumer).chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                                          temperature=7)
    assert info.value.body["param"] == "temperature"


def test_new_adapter_goes_live_while_requests_keep_flowing(client, state, tiny, consumer):
    api = api_for(client, consumer)
    first = publish(state, "acme", random_lora(tiny, seed=3), "live1")
    failures: list[BaseException] = []
    served = {"count": 0}
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for model in (BASE, first):
                try:
                    ask(api, model)
                    served["count"] += 1
                except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                    failures.append(exc)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        time.sleep(1.0)
        second = publish(state, "acme", random_lora(tiny, seed=4), "live2")
        engine = state.inference.engine_for(BASE)
        assert engine.has_adapter(second)  # loaded on publish, before anyone asked for it
        assert ask(api, second).choices[0].message.content
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join()
    assert failures == [] and served["count"] >= 4
    # Deleting the adapter unloads it from serving.
    state.catalog.delete_adapter(None, CLI_CTX, second)
    assert not state.inference.engine_for(BASE).has_adapter(second)
    with pytest.raises(openai.NotFoundError):
        ask(api, second)


def test_broken_adapter_is_reported_and_serving_stays_intact(client, state, tiny, consumer):
    api = api_for(client, consumer)
    good = publish(state, "acme", random_lora(tiny, seed=5), "good")
    files = random_lora(tiny, seed=6)
    config = json.loads(files["adapter_config.json"])
    config["target_modules"] = ["no_such_module"]
    files["adapter_config.json"] = json.dumps(config).encode()
    from appliance.errors import ApplianceError

    job_id = "ftjob-testbroken"
    adapter_id = f"ft:{BASE}:acme:broken:{job_id}"
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=job_id, project=project, base_model=BASE,
                              kind="lora", files=files, manifest={"job_id": job_id})
    state.inference.engine_for(BASE)
    with pytest.raises(ApplianceError):
        state.inference.on_adapter_published(adapter_id)
    with pytest.raises(openai.BadRequestError) as info:
        ask(api, adapter_id)
    assert info.value.body["code"] == "adapter_load_failed"
    assert ask(api, good).choices[0].message.content and ask(api, BASE).choices[0].message.content


def test_vllm_engine_client_against_the_embedded_server(state, tiny, admin_token, tmp_path):
    """The `vllm` engine drives this appliance exactly as it would drive `vllm serve --enable-lora`."""
    from appliance.server.app import create_app
    from serving.errors import AdapterLoadError, AdapterNotFoundError
    from serving.protocol import parse_chat_request
    from serving.vllm_server import serve_in_thread
    from serving.vllm_engine import VllmEngine

    files = random_lora(tiny, seed=7)
    with serve_in_thread(create_app(state.settings, state, run_scheduler=False)) as url:
        engine = VllmEngine(url, api_key=admin_token, base_model_name=BASE, base_model_dir=tiny,
                            shm_dir=tmp_path)
        try:
            info = engine.load_adapter("ops-adapter", files)
            assert info.rank == 4 and engine.has_adapter("ops-adapter")
            req = parse_chat_request({"model": "ops-adapter", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 6, "temperature": 0})
            whole = engine.generate(req)
            streamed = "".join(d.text for d in engine.stream(parse_chat_request(
                {"model": "ops-adapter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                 "temperature": 0, "stream": True})))
            assert whole.choices[0].text == streamed and whole.usage.completion_tokens > 0
            with pytest.raises(AdapterNotFoundError):
                engine.generate(parse_chat_request({"model": "nope", "messages": [{"role": "user", "content": "x"}],
                                                    "max_tokens": 2}))
            broken = {**files, "adapter_model.safetensors": b"not safetensors"}
            with pytest.raises(AdapterLoadError):
                engine.load_adapter("broken", broken)
            # Fields of the wrong type are vLLM-shaped 400s, never a 500.
            for body in ({"lora_name": 7, "lora_path": "/x"}, {"lora_name": "n", "lora_path": ["/x"]}):
                resp = httpx.post(url + "/v1/load_lora_adapter", json=body,
                                  headers={"Authorization": f"Bearer {admin_token}"})
                assert resp.status_code == 400 and resp.json()["error"]["type"] == "InvalidUserInput", resp.text
            resp = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": {"x": 1}},
                              headers={"Authorization": f"Bearer {admin_token}"})
            assert resp.status_code == 404, resp.text
            engine.unload_adapter("ops-adapter")
            assert not engine.has_adapter("ops-adapter")
            assert not state.inference.engine_for(BASE).has_adapter("ops-adapter")
        finally:
            engine.close()
    with state.db.read() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.actor == "admin"))]
    assert "serving.load_adapter" in actions and "serving.unload_adapter" in actions



def test_deleting_the_training_data_withdraws_the_adapter(client, state, tiny, consumer, make_token):
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    file_id = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                          files={"file": ("d.jsonl", b'{"text": "hello"}\n')}).json()["id"]
    job_id = "ftjob-testerase"
    adapter_id = f"ft:{BASE}:acme:erase:{job_id}"
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id=job_id, project=project, base_model=BASE,
                              kind="lora", files=random_lora(tiny, seed=9),
                              manifest={"job_id": job_id, "datasets": [{"id": file_id}]})
    for hook in state.catalog.on_publish:
        hook(adapter_id)
    api = api_for(client, consumer)
    assert ask(api, adapter_id).choices[0].message.content
    assert client.delete(f"/v1/files/{file_id}", headers=bearer(owner)).status_code == 200
    assert not state.inference.engine_for(BASE).has_adapter(adapter_id)
    with pytest.raises(openai.NotFoundError):
        ask(api, adapter_id)
    with state.db.read() as s:
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "adapter.delete"))
    assert event.resource_id == adapter_id and file_id in event.reason
