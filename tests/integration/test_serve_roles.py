"""``appliance serve --role``: the control plane and serving replicas as separate processes (issue 5, process split)."""

from __future__ import annotations

import time

import httpx
import openai

from appliance.modelstore import build_tiny_causal_lm
from tests.cli_helpers import APPLIANCE, Server, run_cli
from tests.conftest import free_port
from tests.timing import Deadline


def _home(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    run_cli(home, "models", "import", str(build_tiny_causal_lm(tmp_path / "tiny", seed=0)), "--name", "tiny-llama")
    run_cli(home, "projects", "add", "acme")
    run_cli(home, "users", "add", "carol", "--role", "consumer", "--project", "acme")
    token = run_cli(home, "tokens", "create", "--user", "carol", "--role", "consumer", "--project", "acme")
    return home, token.stdout.strip()


def test_control_plane_serves_chat_through_a_serving_replica(tmp_path):
    home, consumer = _home(tmp_path)
    replica_port, control_port = free_port(), free_port()
    replica = Server(home, replica_port, argv=[str(APPLIANCE), "serve", "--role", "serving", "--port",
                                               str(replica_port)])
    control = None
    try:
        deadline = Deadline(120)
        while True:  # a replica has no /health: vLLM's protocol has /v1/models
            assert replica.proc.poll() is None and not deadline.expired(), replica.output()
            try:
                if httpx.get(f"{replica.base_url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert [m["id"] for m in httpx.get(f"{replica.base_url}/v1/models").json()["data"]] == ["tiny-llama"]
        assert "serving replica: tiny-llama" in replica.output()

        control = Server(home, control_port, argv=[str(APPLIANCE), "serve", "--role", "control", "--port",
                                                   str(control_port)],
                         APPLIANCE_SERVING_ENGINE="vllm", APPLIANCE_VLLM_URL=replica.base_url)
        control.wait_healthy()
        assert f"serving replicas: {replica.base_url}" in control.output()
        api = openai.OpenAI(api_key=consumer, base_url=control.base_url + "/v1", max_retries=0)
        answer = api.chat.completions.create(model="tiny-llama", max_tokens=6, temperature=0,
                                             messages=[{"role": "user", "content": "hello"}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
        # The request reached the replica: its own counter (vLLM's metric) says so.
        metrics = httpx.get(f"{replica.base_url}/metrics").text
        assert any(line.startswith("vllm:request_success_total") and not line.rstrip().endswith(" 0.0")
                   for line in metrics.splitlines()), metrics
    finally:
        if control is not None:
            control.stop()
        replica.stop()


def test_roles_refuse_what_they_cannot_do(tmp_path):
    home, _ = _home(tmp_path)
    control = run_cli(home, "serve", "--role", "control", check=False)
    assert control.returncode == 2
    assert "error (--role): `--role control` leaves chat to serving replicas" in control.stderr
    assert "APPLIANCE_SERVING_ENGINE=vllm" in control.stderr
    unknown = run_cli(home, "serve", "--role", "serving", "--model", "nope", check=False)
    assert unknown.returncode == 2
    assert "`--model` 'nope' is not an LLM base model of the catalogue; LLM base models: tiny-llama" in unknown.stderr
    misplaced = run_cli(home, "serve", "--model", "tiny-llama", check=False)
    assert misplaced.returncode == 2 and "`--model` applies to `--role serving` only" in misplaced.stderr
