"""Serving replicas: real `appliance serve-engine` processes (vLLM's protocol) behind the control plane.

The control plane runs with ``APPLIANCE_SERVING_ENGINE=vllm`` and the replicas' URLs in
``APPLIANCE_VLLM_URL``. Nothing is mocked: the replicas are separate processes serving a tiny
random model, loading adapters from the tmpfs directories the control plane writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer, free_port, make_settings
from tests.integration.test_inference import BASE, api_for, ask, publish, random_lora
from tests.timing import Deadline


class ReplicaProcess:
    """One ``appliance serve-engine`` process on a loopback port."""

    def __init__(self, model_dir: Path, port: int, log_dir: Path) -> None:
        self.model_dir, self.port, self.log_dir = model_dir, port, log_dir
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> ReplicaProcess:
        self.starts += 1
        log = open(self.log_dir / f"replica-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve-engine", str(self.model_dir), "--served-model-name", BASE,
             "--port", str(self.port), "--device", "cpu", "--max-cpu-loras", "4"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        log.close()
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = Deadline(timeout)
        while deadline:
            assert self.proc is not None and self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"replica {self.url} not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return (self.log_dir / f"replica-{self.port}-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def served(self) -> int:
        """Requests this replica answered (vLLM's ``vllm:request_success_total``, all models)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total"))

    def adapters(self) -> list[str]:
        """The LoRA adapters the replica itself lists (vLLM's /v1/models: adapters have a parent)."""
        cards = httpx.get(self.url + "/v1/models", timeout=5).json()["data"]
        return sorted(c["id"] for c in cards if c.get("parent"))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[list[ReplicaProcess]]:
    from appliance.modelstore import build_tiny_causal_lm

    root = tmp_path_factory.mktemp("replicas")
    model_dir = build_tiny_causal_lm(root / BASE, seed=0)
    procs = [ReplicaProcess(model_dir, free_port(), root).start() for _ in range(3)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.kill()


@pytest.fixture
def settings(replicas, tmp_path):
    """The control plane's settings: the vLLM engine over the replicas, reconciling every second."""
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    return make_settings(tmp_path / "home", APPLIANCE_SERVING_ENGINE="vllm",
                         APPLIANCE_VLLM_URL=",".join(r.url for r in replicas),
                         APPLIANCE_SERVING_RECONCILE_S="1", APPLIANCE_SERVING_SHM_DIR=str(shm))


@pytest.fixture
def tiny(state, replicas) -> Path:
    state.catalog.import_model(CLI_CTX, replicas[0].model_dir, BASE)
    return Path(state.catalog.get_base_model(BASE).path)


def upstream_of(adapter_id: str, names: list[str]) -> list[str]:
    return [n for n in names if n.rsplit("@", 1)[0] == adapter_id]


def wait_for(check, timeout: float = 30.0, what: str = "") -> None:
    deadline = Deadline(timeout)
    while not check():
        if deadline.expired():
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_publish_reaches_every_replica_chat_is_balanced_and_delete_unloads_everywhere(
        client, state, tiny, replicas, make_token, admin_token, tmp_path):
    consumer = make_token("carl", Role.CONSUMER, "acme")
    api = api_for(client, consumer)
    adapter = publish(state, "acme", random_lora(tiny, seed=1), "rep1")
    for r in replicas:
        assert len(upstream_of(adapter, r.adapters())) == 1, r.url

    before = [r.served() for r in replicas]
    answers = {ask(api, adapter).choices[0].message.content for _ in range(6)}
    assert len(answers) == 1  # every replica serves the same weights (temperature 0)
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(api, adapter, stream=True) if c.choices)
    assert streamed == answers.pop()
    assert ask(api, BASE).choices[0].message.content
    after = [r.served() for r in replicas]
    assert sum(after) - sum(before) == 8
    assert sum(a > b for a, b in zip(after, before)) >= 2, after  # balanced, not pinned to one replica

    assert client.delete(f"/v1/models/{adapter}", headers=bearer(admin_token)).status_code == 200
    for r in replicas:
        assert upstream_of(adapter, r.adapters()) == [], r.url
    with pytest.raises(openai.NotFoundError):
        ask(api, adapter)
    with state.db.read() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id == adapter)))
    fanouts = {e.action: e for e in events if e.actor == "system:serving"}
    assert {"serving.load_adapter", "serving.unload_adapter"} <= set(fanouts)
    assert fanouts["serving.load_adapter"].details["replicas"] == {r.url: "loaded" for r in replicas}
    assert fanouts["serving.unload_adapter"].details["replicas"] == {r.url: "unloaded" for r in replicas}

    # A withdrawn adapter that lingers on a replica (it missed the unload) is removed by the
    # reconciler; adapters that are not fine-tunes of this appliance are left alone.
    lingering = tmp_path / "lingering"
    lingering.mkdir()
    for name, data in random_lora(tiny, seed=3).items():
        (lingering / name).write_bytes(data)
    for name in (f"{adapter}@99", "operator-adapter"):
        resp = httpx.post(replicas[1].url + "/v1/load_lora_adapter",
                          json={"lora_name": name, "lora_path": str(lingering)})
        assert resp.status_code == 200, resp.text
    wait_for(lambda: replicas[1].adapters() == ["operator-adapter"], what="the reconciler to unload the withdrawn one")
    httpx.post(replicas[1].url + "/v1/unload_lora_adapter", json={"lora_name": "operator-adapter"})


def test_restarted_replica_gets_published_adapters_back_and_a_dead_one_is_skipped(
        client, state, tiny, replicas, make_token, admin_token):
    consumer = make_token("carl", Role.CONSUMER, "acme")
    api = api_for(client, consumer)
    adapter = publish(state, "acme", random_lora(tiny, seed=2), "rep2")
    want = ask(api, adapter).choices[0].message.content

    victim = replicas[0]
    victim.kill()
    # Chat goes on: requests that find the dead replica fail over to the others.
    for _ in range(4):
        assert ask(api, adapter).choices[0].message.content == want
    assert ask(api, BASE).choices[0].message.content
    listed = client.get("/v1/serving/replicas", headers=bearer(admin_token)).json()["data"]
    status = {r["url"]: r for r in listed if r["base_model"] == BASE}
    assert status.keys() == {r.url for r in replicas}
    assert status[victim.url]["up"] is False and "unreachable" in status[victim.url]["last_error"]

    victim.start().wait_ready()  # back, empty
    wait_for(lambda: upstream_of(adapter, victim.adapters()) != [], what="the reconciler to reload the adapter")
    assert all(len(upstream_of(adapter, r.adapters())) == 1 for r in replicas)
    wait_for(lambda: ask(api, adapter).choices[0].message.content == want and victim.served() > 0,
             what="the restarted replica to serve")
    with state.db.read() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "serving.reconcile")))
    back = [e for e in events if e.resource_id == victim.url and e.details["loaded"]]
    assert back and back[0].details["came_back"] and back[0].actor == "system:serving"
    assert upstream_of(adapter, back[0].details["loaded"])


def test_no_replica_up_is_a_clear_503(client, state, tiny, replicas, make_token):
    api = api_for(client, make_token("carl", Role.CONSUMER, "acme"))
    assert ask(api, BASE).choices[0].message.content
    for r in replicas:
        r.kill()
    with pytest.raises(openai.InternalServerError) as info:
        ask(api, BASE)
    assert info.value.status_code == 503 and info.value.body["code"] == "no_replica_available"
    assert all(r.url in info.value.body["message"] for r in replicas)
