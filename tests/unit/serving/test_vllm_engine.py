"""The vLLM client's fault handling, against the vLLM-compatible stand-in (over a real TransformersEngine).

What a real vLLM does is tested against vLLM itself (tests/integration/test_vllm_real.py); the
stand-in stays here where a fault is injected: a server that sees a broken adapter the client could
not, a server that forgot its adapters, a server that does not answer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.errors import InvalidRequestError
from serving.errors import AdapterLoadError, AdapterNotFoundError, EngineError
from serving.protocol import parse_chat_request
from serving.vllm_server import create_vllm_compatible_app, serve_in_thread
from serving.transformers_engine import EngineConfig, TransformersEngine
from serving.vllm_engine import VllmEngine
from tests.unit.serving.conftest import BASE, with_tensors

MESSAGES = [{"role": "user", "content": "Write a haiku about tea."}]


def chat(model: str = BASE, **kw):
    return parse_chat_request({"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": 8, **kw})


@pytest.fixture(scope="module")
def server(tiny_parts) -> Iterator[tuple[str, TransformersEngine]]:
    model, tokenizer = tiny_parts
    inner = TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE,
                               config=EngineConfig(max_resident_adapters=8))
    with serve_in_thread(create_vllm_compatible_app(inner)) as url:
        yield url, inner
    inner.close()


@pytest.fixture(scope="module")
def base_dir(tiny_parts, tmp_path_factory) -> Path:
    """The base model's config and tokenizer, as the appliance keeps them next to vLLM (no weights needed)."""
    model, tokenizer = tiny_parts
    d = tmp_path_factory.mktemp("base")
    model.config.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def client(server, base_dir, tmp_path) -> Iterator[VllmEngine]:
    url, inner = server
    eng = VllmEngine(url, base_model_dir=base_dir, shm_dir=tmp_path, max_lora_rank=16)
    yield eng
    eng.close()
    for name in [a.name for a in inner.adapters()]:
        inner.unload_adapter(name)  # what a server restart would do


def test_errors_map_to_our_exceptions(client, server, adapters, base_dir, tmp_path):
    url, inner = server
    with pytest.raises(AdapterNotFoundError):
        client.generate(chat("missing"))
    with pytest.raises(InvalidRequestError) as err:
        client.generate(chat(temperature=5))
    assert err.value.param == "temperature"
    with pytest.raises(InvalidRequestError, match="context"):  # checked by the server
        client.generate(chat(max_tokens=255))

    bad_shape = with_tensors(adapters["ad1"], lambda t: {k: v[:, :-1].contiguous() if "lora_A" in k else v
                                                        for k, v in t.items()})
    with pytest.raises(AdapterLoadError, match="another base model"):  # refused here, never sent
        client.load_adapter("bad", bad_shape)
    assert inner.adapters() == []

    # Without the base directory only the server can see the shape mismatch. It answers 500, as vLLM
    # >= 0.20 does: still a refused adapter (a 4xx to the caller), never an outage.
    shm = tmp_path / "blind"
    shm.mkdir()
    with VllmEngine(url, shm_dir=shm) as blind:
        with pytest.raises(AdapterLoadError, match="refused the adapter \\(500\\).*another base model") as info:
            blind.load_adapter("bad", bad_shape)
        assert info.value.status == 400
        assert not blind.has_adapter("bad") and inner.adapters() == []
        assert [r["up"] for r in blind.replica_status()] == [True]
        (root,) = list(shm.iterdir())
        assert list(root.iterdir()) == []  # its directory is gone too
    assert not root.exists()  # close() removes the private root


def test_adapter_the_server_forgot_is_loaded_again(client, server, adapters):
    _, inner = server
    client.load_adapter("ad2", adapters["ad2"])
    want = client.generate(chat("ad2")).choices
    inner.unload_adapter("ad2@1")  # as after a vLLM restart
    assert client.generate(chat("ad2")).choices == want
    inner.unload_adapter("ad2@1")
    assert "".join(d.text for d in client.stream(chat("ad2", stream=True))) == want[0].text


def test_the_stand_in_keeps_unloaded_weights_and_counts_by_base_model(client, server, adapters):
    """As vLLM >= 0.20 does (issues 42633, 54839): unloading frees nothing; metrics name the base model."""
    url, _ = server

    def metric(name: str) -> list[str]:
        return [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(name)]

    before = float(metric("appliance_standin_retained_lora_bytes")[0].split()[-1])
    client.load_adapter("kept", adapters["ad1"])
    client.generate(chat("kept"))
    client.unload_adapter("kept")
    after = float(metric("appliance_standin_retained_lora_bytes")[0].split()[-1])
    assert after > before  # the weights stay in the server's memory after the unload
    assert all('model_name="tiny-llama"' in line for line in metric("vllm:request_success_total{"))


def test_unreachable_server(tmp_path):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with VllmEngine("http://127.0.0.1:9", base_model_name="b", shm_dir=tmp_path,
                    transport=httpx.MockTransport(refuse)) as eng:
        with pytest.raises(EngineError, match="unreachable"):
            eng.generate(chat("b"))
        with pytest.raises(EngineError, match="unreachable"):
            list(eng.stream(chat("b", stream=True)))


def test_decrypted_adapters_left_by_a_dead_process_are_swept_at_start(tmp_path):
    """A crash leaves `appliance-lora-<pid>-*` in tmpfs: the next engine removes those of dead processes."""
    import subprocess

    gone = subprocess.Popen(["true"])  # noqa: S607 - a short-lived process gives a dead pid
    gone.wait()
    stale = tmp_path / f"appliance-lora-{gone.pid}-{'ab' * 6}"
    (stale / "1").mkdir(parents=True, mode=0o700)
    (stale / "1" / "adapter_model.safetensors").write_bytes(b"decrypted weights")
    alive = tmp_path / f"appliance-lora-1-{'cd' * 6}"  # pid 1 lives: another appliance's, left alone
    alive.mkdir(mode=0o700)
    unrelated = tmp_path / "appliance-lora-notes"
    unrelated.mkdir()
    with VllmEngine("http://127.0.0.1:9", base_model_name="b", shm_dir=tmp_path) as eng:
        mine = eng._root  # noqa: SLF001
        assert not stale.exists() and alive.is_dir() and unrelated.is_dir() and mine.is_dir()
        with VllmEngine("http://127.0.0.1:9", base_model_name="c", shm_dir=tmp_path):
            assert mine.is_dir()  # a second engine of this process keeps the first one's directory
