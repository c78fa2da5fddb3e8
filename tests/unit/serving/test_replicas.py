"""The vLLM client over several replicas (vLLM-compatible test servers over real TransformersEngines)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.errors import AdapterLoadError, EngineError, NoReplicaError
from serving.protocol import parse_chat_request
from serving.replicas import ReplicaSet, parse_replica_map, parse_replica_urls, replicas_for
from serving.vllm_server import create_vllm_compatible_app, serve_in_thread
from serving.transformers_engine import EngineConfig, TransformersEngine
from serving.vllm_engine import VllmEngine
from tests.conftest import free_port
from tests.unit.serving.conftest import BASE, with_tensors


def chat(model: str = BASE, **kw):
    return parse_chat_request({"model": model, "messages": [{"role": "user", "content": "Tea?"}],
                               "temperature": 0, "max_tokens": 6, **kw})


@pytest.fixture(scope="module")
def servers(tiny_parts) -> Iterator[list[tuple[str, TransformersEngine]]]:
    model, tokenizer = tiny_parts
    inners = [TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE,
                                 config=EngineConfig(max_resident_adapters=8)) for _ in range(2)]
    with serve_in_thread(create_vllm_compatible_app(inners[0])) as a, \
            serve_in_thread(create_vllm_compatible_app(inners[1])) as b:
        yield [(a, inners[0]), (b, inners[1])]
    for inner in inners:
        inner.close()


@pytest.fixture(scope="module")
def base_dir(tiny_parts, tmp_path_factory) -> Path:
    model, tokenizer = tiny_parts
    d = tmp_path_factory.mktemp("base")
    model.config.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def engine(servers, base_dir, tmp_path) -> Iterator[VllmEngine]:
    eng = VllmEngine(",".join(url for url, _ in servers), base_model_dir=base_dir, shm_dir=tmp_path,
                     max_lora_rank=16, retry_down_s=60)
    yield eng
    eng.close()
    for _, inner in servers:
        for name in [a.name for a in inner.adapters()]:
            inner.unload_adapter(name)


def names(inner: TransformersEngine) -> list[str]:
    return sorted(a.name for a in inner.adapters())


def test_replica_urls_are_parsed_and_checked():
    assert parse_replica_urls(" http://a:1/, http://b:2 ") == ["http://a:1", "http://b:2"]
    for bad, why in (("", "one or more"), ("a:1", "http"), ("http://a:1,http://a:1/", "twice")):
        with pytest.raises(ValueError, match=why):
            parse_replica_urls(bad)


def test_each_base_model_has_its_own_replicas():
    value = "llama=http://a:1, llama=http://a:2, qwen=http://b:1"
    assert parse_replica_map(value) == {"llama": ["http://a:1", "http://a:2"], "qwen": ["http://b:1"]}
    assert replicas_for(value, "qwen") == ["http://b:1"]
    with pytest.raises(ValueError, match="no vLLM server is set for base model 'mistral'.*add mistral=URL"):
        replicas_for(value, "mistral")
    # Plain URLs serve every base model no entry names (one base model: the old form).
    mixed = "http://c:1,llama=http://a:1"
    assert replicas_for(mixed, "llama") == ["http://a:1"] and replicas_for(mixed, "qwen") == ["http://c:1"]
    for bad, why in (("=http://a:1", "names no base model"), ("llama=http://a:1,qwen=http://a:1", "twice"),
                     ("llama=a:1", "http"), (" , ", "one or more")):
        with pytest.raises(ValueError, match=why):
            parse_replica_map(bad)


def test_least_outstanding_then_round_robin():
    rs = ReplicaSet(["http://a:1", "http://b:2", "http://c:3"])
    firsts = {rs.candidates()[0].url for _ in range(3)}
    assert firsts == {"http://a:1", "http://b:2", "http://c:3"}  # equals take turns
    a, b, c = rs.replicas
    with rs.using(a), rs.using(b):
        assert rs.candidates()[0] is c
    rs.mark_down(c, "unreachable: refused")
    assert c not in rs.candidates(exclude=[a])
    assert "http://c:3: unreachable: refused" in rs.no_replica().message
    rs.close()


def test_loads_everywhere_balances_and_unloads_everywhere(engine, servers, adapters):
    (_, one), (_, two) = servers
    engine.load_adapter("ad0", adapters["ad0"])
    assert names(one) == names(two) == ["ad0@1"]
    want = one.generate(chat("ad0@1")).choices
    assert two.generate(chat("ad0@1")).choices == want
    for _ in range(4):
        assert engine.generate(chat("ad0")).choices == want
    assert all(r["served"] == 2 for r in engine.replica_status())
    engine.unload_adapter("ad0")
    assert names(one) == names(two) == []


def test_reconcile_restores_a_restarted_replica_and_drops_strays(engine, servers, adapters, tmp_path):
    (_, one), (_, two) = servers
    engine.load_adapter("ad1", adapters["ad1"])
    one.unload_adapter("ad1@1")  # as after a restart
    stray = tmp_path / "stray"
    stray.mkdir()
    for name, data in adapters["ad2"].items():
        (stray / name).write_bytes(data)
    two.load_adapter("left-behind@7", stray)  # loaded by an earlier life of the control plane
    reports = {r.replica: r for r in engine.reconcile()}
    (url_one, _), (url_two, _) = servers
    assert reports[url_one].loaded == ["ad1@1"] and reports[url_two].unloaded == ["left-behind@7"]
    assert names(one) == names(two) == ["ad1@1"]
    assert not any(r.changed for r in engine.reconcile())  # nothing left to do


def test_a_dead_replica_is_skipped_and_repaired_when_it_answers(servers, adapters, base_dir, tmp_path):
    (url, inner), _ = servers
    dead = f"http://127.0.0.1:{free_port()}"
    with VllmEngine([dead, url], base_model_dir=base_dir, shm_dir=tmp_path, max_lora_rank=16) as eng:
        eng.load_adapter("ad3", adapters["ad3"])  # one replica is enough; the other is left to reconcile
        assert names(inner) == ["ad3@1"]
        fanout = eng.last_fanout("ad3")
        assert fanout[url] == "loaded" and fanout[dead].startswith("down: ") and "unreachable" in fanout[dead]
        for _ in range(3):
            assert eng.generate(chat("ad3")).choices[0].text
            assert "".join(d.text for d in eng.stream(chat("ad3", stream=True)))
        status = {r["url"]: r for r in eng.replica_status()}
        assert not status[dead]["up"] and "unreachable" in status[dead]["last_error"]
        report = {r.replica: r for r in eng.reconcile()}
        assert not report[dead].up and report[dead].error
    assert names(inner) == []


def test_every_replica_down_or_refusing(servers, adapters, base_dir, tmp_path):
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with VllmEngine(dead, base_model_name=BASE, shm_dir=tmp_path) as eng:
        with pytest.raises(NoReplicaError, match="no serving replica answered") as info:
            eng.generate(chat())
        assert all(u in info.value.message for u in dead)
        with pytest.raises(NoReplicaError):
            list(eng.stream(chat(stream=True)))
        with pytest.raises(EngineError):
            eng.load_adapter("ad0", adapters["ad0"])
        assert not eng.has_adapter("ad0")
    bad = with_tensors(adapters["ad1"], lambda t: {k: v[:, :-1].contiguous() if "lora_A" in k else v
                                                   for k, v in t.items()})
    with VllmEngine([u for u, _ in servers], shm_dir=tmp_path) as blind:  # no base dir: the servers judge
        with pytest.raises(AdapterLoadError, match="refused the adapter"):
            blind.load_adapter("bad", bad)
        assert not blind.has_adapter("bad") and all(names(inner) == [] for _, inner in servers)


def test_api_key_is_required_when_set(tiny_parts, tmp_path):
    model, tokenizer = tiny_parts
    inner = TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE)
    with serve_in_thread(create_vllm_compatible_app(inner, api_key="s3cret")) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        with VllmEngine(url, api_key="s3cret", base_model_name=BASE, shm_dir=tmp_path) as eng:
            assert eng.generate(chat()).choices[0].text
    inner.close()
