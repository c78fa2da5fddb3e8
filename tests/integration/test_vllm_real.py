"""The vLLM engine against a real vLLM (PyPI's CPU build, ``tests/vllm_helpers.py``).

The appliance runs with ``APPLIANCE_SERVING_ENGINE=vllm`` in front of real vLLM OpenAI servers on
loopback, each started with an ``--api-key`` the appliance reads from a file. The tests' client is
the official ``openai`` package. Two servers: ``main`` serves the tiny base model with runtime LoRA
updating on; ``locked`` serves a second base model with runtime LoRA updating off (a set-up
mistake the appliance must name, not take for an outage).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.roles import Role
from serving.errors import AdapterLoadError, InvalidRequestError, ServerConfigError
from serving.vllm_engine import VllmEngine
from tests.conftest import CLI_CTX, bearer, make_settings
from tests.integration.test_inference import BASE, api_for, ask, publish, random_lora
from tests.timing import Deadline
from tests.vllm_helpers import VllmProcess

pytestmark = pytest.mark.slow

OTHER = "tiny-other"
KEY = "vllm-test-key-7f3a9c"


def _model(root: Path, name: str, seed: int) -> Path:
    from appliance.modelstore import build_tiny_causal_lm

    return build_tiny_causal_lm(root / name, seed=seed, head_dim=32)  # vLLM's CPU attention: heads of 32 and up


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, VllmProcess]]:
    root = tmp_path_factory.mktemp("vllm")
    procs = {"main": VllmProcess(_model(root, BASE, 0), BASE, root, api_key=KEY),
             "locked": VllmProcess(_model(root, OTHER, 1), OTHER, root, api_key=KEY, runtime_lora=False)}
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture
def settings(servers, tmp_path):
    """The control plane in front of both servers, one per base model, reconciling every second."""
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    key = tmp_path / "vllm.key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    return make_settings(tmp_path / "home", APPLIANCE_SERVING_ENGINE="vllm",
                         APPLIANCE_VLLM_URL=f"{BASE}={servers['main'].url},{OTHER}={servers['locked'].url}",
                         APPLIANCE_VLLM_API_KEY_FILE=str(key), APPLIANCE_SERVING_RECONCILE_S="1",
                         APPLIANCE_SERVING_SHM_DIR=str(shm))


@pytest.fixture
def tiny(state, servers) -> Path:
    for proc in servers.values():
        state.catalog.import_model(CLI_CTX, proc.model_dir, proc.name)
    return Path(state.catalog.get_base_model(BASE).path)


def upstream_of(adapter_id: str, names: list[str]) -> list[str]:
    return [n for n in names if n.rsplit("@", 1)[0] == adapter_id]


def wait_for(check, timeout: float = 60.0, what: str = "") -> None:
    deadline = Deadline(timeout)
    while not check():
        if deadline.expired():
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_publish_chat_replace_unload_restart_through_a_real_vllm(client, state, tiny, servers, make_token,
                                                                  admin_token):
    main = servers["main"]
    api = api_for(client, make_token("carl", Role.CONSUMER, "acme"))
    base_answer = ask(api, BASE).choices[0].message.content
    assert base_answer

    # Publish: the adapter reaches vLLM under a versioned name and answers through the appliance.
    adapter = publish(state, "acme", random_lora(tiny, seed=1), "v1")
    (upstream,) = upstream_of(adapter, main.adapters())
    plain = ask(api, adapter)
    assert plain.model == adapter and plain.usage.completion_tokens > 0
    answer = plain.choices[0].message.content
    assert answer and answer != base_answer  # the adapter steers the model
    chunks = list(ask(api, adapter, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # A system message and a named user message (no `"name": null` goes upstream).
    sys_answer = api.chat.completions.create(
        model=adapter, max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "carl"}])
    assert sys_answer.choices[0].message.content

    # Replace: the new version is loaded before the old one goes; vLLM holds only the new one.
    engine = state.inference.engine_for(BASE)
    engine.load_adapter(adapter, random_lora(tiny, seed=5), replace=True)
    (replaced,) = upstream_of(adapter, main.adapters())
    assert replaced != upstream
    assert ask(api, adapter).choices[0].message.content != answer
    engine.load_adapter(adapter, random_lora(tiny, seed=1), replace=True)  # back to the published weights
    assert ask(api, adapter).choices[0].message.content == answer

    # Restart vLLM: it comes back empty; the reconciler loads the adapter again.
    main.restart()
    wait_for(lambda: upstream_of(adapter, main.adapters()) != [], what="the reconciler to restore the adapter")
    assert ask(api, adapter).choices[0].message.content == answer
    with state.db.read() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "serving.reconcile")))
    assert any(e.resource_id == main.url and upstream_of(adapter, e.details["loaded"]) for e in events)

    # Unload: deleting the model takes it off vLLM, and the appliance answers 404 for it.
    assert client.delete(f"/v1/models/{adapter}", headers=bearer(admin_token)).status_code == 200
    assert upstream_of(adapter, main.adapters()) == []
    with pytest.raises(openai.NotFoundError):
        ask(api, adapter)
    assert ask(api, BASE).choices[0].message.content == base_answer


def test_an_adapter_vllm_refuses_is_a_4xx_not_an_outage(client, state, tiny, servers, make_token, admin_token,
                                                         tmp_path):
    """Rank 32 passes the appliance's checks (it serves up to 64) but this vLLM takes up to 16."""
    api = api_for(client, make_token("carl", Role.CONSUMER, "acme"))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(
        r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path / "rank32"
    model.save_pretrained(out)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(AdapterLoadError, match="refused the adapter"):  # the publish hook loads it at once
        publish(state, "acme", files, "r32")
    adapter = f"ft:{BASE}:acme:r32:ftjob-testr32"

    with pytest.raises(openai.BadRequestError) as info:
        ask(api, adapter)
    body = info.value.body
    assert body["code"] == "adapter_load_failed" and "refused the adapter" in body["message"]
    assert "rank" in body["message"].lower(), body["message"]  # vLLM's own words say why
    listed = client.get("/v1/serving/replicas", headers=bearer(admin_token)).json()["data"]
    (main_status,) = [r for r in listed if r["base_model"] == BASE]
    assert main_status["up"] is True
    assert ask(api, BASE).choices[0].message.content  # the server still serves

    # Audited as a refusal; the reconciler does not send it to vLLM again on every pass.
    def refusals() -> list[AuditEvent]:
        with state.db.read() as s:
            return list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id == adapter,
                                                           AuditEvent.action == "serving.load_adapter")))

    before = refusals()
    assert before and all(e.outcome == "failure" and "rank" in e.details["error"].lower() for e in before)
    for _ in range(3):
        reports = state.inference.reconcile()[BASE]
        assert all(not r["failed"] for r in reports), reports
        assert upstream_of(adapter, servers["main"].adapters()) == []
    assert len(refusals()) == len(before)


def test_set_up_mistakes_are_named_not_taken_for_outages(client, state, tiny, servers, make_token, tmp_path):
    locked = servers["locked"]
    # The start-up check (the reconciler's first act) finds it and audits it, naming the fix.
    assert sorted(state.inference.start_replicated_engines()) == sorted([BASE, OTHER])
    with state.db.read() as s:
        checks = [e for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "serving.reconcile"))
                  if e.resource_id == locked.url]
    assert checks and checks[0].outcome == "failure"
    assert "runtime LoRA updating is off" in checks[0].details["error"]
    # Runtime LoRA updating off: the base model serves, an adapter cannot, and the answer says why.
    api = api_for(client, make_token("carl", Role.CONSUMER, "acme"))
    assert ask(api, OTHER).choices[0].message.content  # routed to its own server (APPLIANCE_VLLM_URL)
    engine = state.inference.engine_for(OTHER)
    assert engine.replica_urls == [locked.url]
    problems = engine.check_replicas()
    assert len(problems) == 1 and "runtime LoRA updating is off" in problems[0]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in problems[0]
    files = random_lora(Path(state.catalog.get_base_model(OTHER).path), seed=1)
    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps({**config, "base_model_name_or_path": OTHER}).encode()
    with pytest.raises(ServerConfigError, match="runtime LoRA updating is off"):
        engine.load_adapter("ops-adapter", files)
    assert [r["up"] for r in engine.replica_status()] == [True]

    # A wrong api key: said as such, at start-up and on a request.
    shm = tmp_path / "shm-wrong"
    shm.mkdir()
    with VllmEngine(locked.url, api_key="not-the-key", shm_dir=shm) as wrong:
        with pytest.raises(ServerConfigError, match=r"refused the appliance's api key \(401\)"):
            wrong.wait_ready(timeout_s=10)
    # Without any key vLLM answers 401 too; the message names the setting to fix.
    resp = httpx.get(locked.url + "/v1/models", timeout=10)
    assert resp.status_code == 401
    with VllmEngine(locked.url, shm_dir=shm) as keyless:
        with pytest.raises(ServerConfigError, match="APPLIANCE_VLLM_API_KEY_FILE"):
            keyless.wait_ready(timeout_s=10)
    assert json.loads(resp.text)  # vLLM's own 401 body is JSON


# -- the engine (serving.vllm_engine.VllmEngine) on its own, against the real server -----------------


@pytest.fixture
def engine(servers, tmp_path) -> Iterator[VllmEngine]:
    main = servers["main"]
    with VllmEngine(main.url, api_key=KEY, base_model_dir=main.model_dir, shm_dir=tmp_path, max_lora_rank=16) as eng:
        yield eng


def _chat(model: str, **kw):
    from serving.protocol import parse_chat_request

    return parse_chat_request({"model": model, "messages": [{"role": "user", "content": "Write a haiku about tea."}],
                               "temperature": 0, "max_tokens": 8, **kw})


def test_engine_base_facts_load_chat_stream_unload(engine, servers, tmp_path):
    import os
    import stat

    from transformers import AutoTokenizer

    from serving.errors import AdapterNotFoundError
    from serving.protocol import parse_completion_request

    main = servers["main"]
    assert engine.base_model_name == BASE and engine.max_context == 512  # vLLM's --max-model-len
    messages = [{"role": "user", "content": "hi"}]
    assert engine.apply_chat_template(messages) == AutoTokenizer.from_pretrained(main.model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)

    info = engine.load_adapter("ad0", random_lora(main.model_dir, seed=11))
    assert info.rank == 4 and engine.has_adapter("ad0")
    # The adapter's files sit in a private directory, written nowhere else, until unload.
    (root,) = [p for p in tmp_path.iterdir() if p.name.startswith("appliance-lora-")]
    (adir,) = list(root.iterdir())
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700 and stat.S_IMODE(os.stat(adir).st_mode) == 0o700
    assert sorted(p.name for p in adir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in adir.iterdir())
    (upstream,) = upstream_of("ad0", main.adapters())

    got = engine.generate(_chat("ad0"))
    direct = httpx.post(main.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        json={**_chat("ad0").to_dict(), "model": upstream}).json()
    assert got.model == "ad0" and got.choices[0].text == direct["choices"][0]["message"]["content"]
    assert got.usage.completion_tokens == direct["usage"]["completion_tokens"] == 8
    stream = engine.stream(_chat("ad0", stream=True))
    deltas = list(stream)
    assert "".join(d.text for d in deltas) == got.choices[0].text
    assert deltas[-1].finish_reason == "length" and stream.usage == got.usage

    comp = engine.generate(parse_completion_request({"model": "ad0", "prompt": "Once", "max_tokens": 4,
                                                     "temperature": 0}))
    streamed = list(engine.stream(parse_completion_request({"model": "ad0", "prompt": "Once", "max_tokens": 4,
                                                            "temperature": 0, "stream": True})))
    assert "".join(d.text for d in streamed) == comp.choices[0].text and comp.usage.completion_tokens == 4
    sampled = engine.generate(parse_completion_request({"model": "ad0", "prompt": "Once", "max_tokens": 4,
                                                        "temperature": 1.0, "seed": 7, "n": 2}))
    assert [c.index for c in sampled.choices] == [0, 1] and sampled.usage.completion_tokens == 8
    # vLLM's own rules come back as 400s naming them (it refuses n > 1 with greedy sampling).
    with pytest.raises(InvalidRequestError, match="n must be 1"):
        engine.generate(parse_completion_request({"model": "ad0", "prompt": "Once", "max_tokens": 4,
                                                  "temperature": 0, "n": 2}))

    # Closing a stream early releases the adapter (unload would wait for its pin otherwise).
    early = engine.stream(_chat("ad0", max_tokens=200, stream=True))
    assert next(early).index == 0
    early.close()
    engine.unload_adapter("ad0")
    assert not adir.exists() and upstream_of("ad0", main.adapters()) == [] and not engine.has_adapter("ad0")
    with pytest.raises(AdapterNotFoundError):
        engine.generate(_chat("ad0"))


def test_engine_concurrent_clients_on_different_adapters(engine, servers):
    import threading

    main = servers["main"]
    for i, name in enumerate(("ad1", "ad2", "ad3")):
        engine.load_adapter(name, random_lora(main.model_dir, seed=20 + i))
    models = [BASE, "ad1", "ad2", "ad3"]
    results, errors = [], []

    def run(model: str) -> None:
        try:
            results.append((model, engine.generate(_chat(model)).choices[0].text))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in models * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 8
    assert len({text for _, text in results}) >= 3  # different adapters, different answers
