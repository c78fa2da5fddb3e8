"""The Ray executor end to end, on a Ray cluster this module starts: 127.0.0.1, two CPUs, token auth on.

A LoRA job asking for two workers runs as a Ray job (job submission API)
with two Ray Train ranks on gloo, and ends like a local job: a signed
manifest and an adapter that stock peft loads. No data key reaches Ray.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from appliance.crypto.envelope import WrappedKey
from appliance.jobs import tunnel
from appliance.storage.blobs import key_context
from appliance.storage.models import DataKey
from tests.conftest import CLI_CTX, REPO, free_port, make_settings
from tests.integration.test_jobs import api_for, hp, owner, qa, tiny_model, trainer, upload, wait_for  # noqa: F401
from tests.timing import Deadline

try:
    from ray.job_submission import JobStatus, JobSubmissionClient
except ImportError:  # pragma: no cover - the suite's venv has the extra; fail loudly, never skip in CI
    pytest.fail("the Ray tests need the `ray` extra: pip install -e '.[ray]' (make test installs it)",
                pytrace=False)

pytestmark = pytest.mark.slow


@dataclass
class RayCluster:
    address: str
    token_file: Path
    client: JobSubmissionClient
    node_key_file: Path


def _start_head(temp_dir: str, token: str, log: Path) -> tuple[subprocess.Popen, str]:
    dashboard = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "RAY_"))},
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        # Ray resolves 127.0.0.1 to the host's routable address unless told this is a single-host cluster.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    ports = {flag: free_port() for flag in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port", "node-manager-port", "object-manager-port")}
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=100000000", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[RayCluster]:
    """A one-node Ray cluster on 127.0.0.1 with two CPUs and token authentication; torn down afterwards."""
    base = tmp_path_factory.mktemp("ray")
    token = secrets.token_hex(32)
    token_file = base / "ray.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    node_key_file = base / "node.key"  # the same path on the control plane and the (one) node
    node_key_file.write_bytes(os.urandom(32))
    node_key_file.chmod(0o400)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    proc, address = _start_head(temp_dir, token, base / "head.log")
    try:
        deadline = Deadline(120)
        while True:
            try:
                client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                break
            except Exception:
                if proc.poll() is not None or deadline.expired():
                    pytest.fail(f"the Ray head did not come up:\n{(base / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield RayCluster(address, token_file, client, node_key_file)
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group (every Ray process it started), then SIGKILL what lingers.

    A graceful stop after jobs have run takes Ray about half a minute; nothing of the cluster outlives the module.
    """
    for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        deadline = Deadline(grace)
        while deadline:  # the group's other members may outlive its leader briefly
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture
def settings(tmp_path, ray_cluster):
    return make_settings(
        tmp_path / "home", APPLIANCE_EXECUTOR="ray", APPLIANCE_RAY_ADDRESS=ray_cluster.address,
        APPLIANCE_RAY_TOKEN_FILE=str(ray_cluster.token_file), APPLIANCE_RAY_CALLBACK_ADDRESS="127.0.0.1:0",
        APPLIANCE_RAY_NODE_KEY_FILE=str(ray_cluster.node_key_file),
        APPLIANCE_RAY_MAX_WORKERS="2", APPLIANCE_RAY_CONNECT_TIMEOUT_S="300",
    )


def test_the_cluster_refuses_job_submission_without_its_token(ray_cluster):
    for headers in (None, {"Authorization": "Bearer " + secrets.token_hex(32)}):
        with pytest.raises(Exception, match="(?i)auth"):
            JobSubmissionClient(ray_cluster.address, headers=headers)


def test_lora_job_with_two_ddp_workers_on_ray(client, state, tiny_model, trainer, owner, ray_cluster, tmp_path):
    assert state.scheduler.executor.name == "ray"
    train_id = upload(client, owner, [qa(i) for i in range(24)])
    api = api_for(client, trainer)
    for compute, param in (({"workers": 3}, "compute.workers"), ({"gpus": 1}, "compute.gpus")):
        with pytest.raises(openai.BadRequestError) as info:
            api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, extra_body={"compute": compute})
        assert info.value.body["param"] == param
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, suffix="ray", seed=7,
                                      method={"type": "lora", "lora": {"hyperparameters": hp()}},
                                      extra_body={"compute": {"workers": 2}})
    assert {k: v for k, v in job.model_extra["compute"].items() if k != "plan"} == {"workers": 2}
    job = wait_for(api, job.id, timeout=300)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{tiny_model}:acme:ray:{job.id}" and job.trained_tokens > 0
    metrics = job.model_extra["metrics"]
    assert metrics["valid_loss_after"] < metrics["valid_loss_before"]

    events = api.fine_tuning.jobs.list_events(job.id, limit=200).data
    messages = [e.message for e in events]
    submitted = next(e for e in events if e.message.startswith("Submitted to Ray as "))
    assert submitted.data["workers"] == 2
    assert any("with 2 data-parallel workers (gloo)" in m for m in messages), messages
    # Each rank ran its worker in the sandbox on its node, keeping the node's network for the collective,
    # and the job says so for every rank: in its events and in the privacy evidence the manifest signs.
    placed = sorted((e.data["rank"], e.data["level"], e.data["network"]) for e in events
                    if e.type == "isolation" and e.data and "rank" in e.data)
    assert placed == [(0, "sandbox", "shared"), (1, "sandbox", "shared")], placed
    assert any(e.type == "metrics" and e.data and "train_loss" in e.data for e in events)
    assert api.fine_tuning.jobs.checkpoints.list(job.id).data  # rank 0 checkpointed

    # The same kind of adapter and manifest as a local job.
    model = next(m for m in api.models.list().data if m.id == job.fine_tuned_model)
    manifest = model.model_extra["manifest"]
    assert manifest["format"] == "appliance-adapter-manifest/1" and manifest["seed"] == 7
    assert manifest["datasets"][0]["id"] == train_id and manifest["base_model"]["name"] == tiny_model
    assert manifest["hyperparameters"]["lora_r"] == 4
    assert manifest["privacy"]["worker_isolation"] == {
        "level": "sandbox", "executor": "ray",
        "ranks": [{"rank": 0, "level": "sandbox", "network": "shared"},
                  {"rank": 1, "level": "sandbox", "network": "shared"}]}
    assert state.catalog.verify_manifest(state.catalog.get_adapter(None, job.fine_tuned_model))
    assert job.model_extra["privacy"]["worker_isolation"] == manifest["privacy"]["worker_isolation"]
    out = state.catalog.export(None, CLI_CTX, job.fine_tuned_model, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(state.catalog.get_base_model(tiny_model).path)
    PeftModel.from_pretrained(base, out)

    # Ray saw the job, but never a data key: not in the entrypoint, runtime env, metadata or logs.
    submission_id = submitted.data["ray_submission_id"]
    info = ray_cluster.client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED and info.metadata["appliance_job_id"] == job.id
    assert info.driver_info.node_ip_address == "127.0.0.1"
    with state.db.read() as s:
        row = s.get(DataKey, train_id)
        data_key = state.blobs.keys.unwrap(WrappedKey(row.kek_id, row.wrapped), key_context(train_id, row.project))
    seen_by_ray = json.dumps(info.__dict__, default=str) + ray_cluster.client.get_job_logs(submission_id)
    for form in (base64.b64encode(data_key).decode(), data_key.hex()):
        assert form not in seen_by_ray
    # Nor the launch's ticket: Ray holds the nonce it is derived from, useless without the node key.
    nonce = bytes.fromhex(info.runtime_env["env_vars"][tunnel.NONCE_ENV])
    ticket = tunnel.derive_ticket(ray_cluster.node_key_file.read_bytes(), nonce, job.id)
    for form in (base64.b64encode(ticket).decode(), ticket.hex()):
        assert form not in seen_by_ray
    assert "Item 3 is a blue box" not in seen_by_ray  # nor a training record


def test_lora_job_with_the_base_model_sharded_over_two_ray_workers(client, state, tiny_model, trainer, owner,
                                                                   ray_cluster, tmp_path):
    """`compute.sharding: fsdp`: each rank holds half of every decoder layer; same kind of adapter."""
    train_id = upload(client, owner, [qa(i) for i in range(24)])
    api = api_for(client, trainer)
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                    method={"type": "qlora", "qlora": {"hyperparameters": hp()}},
                                    extra_body={"compute": {"workers": 2, "sharding": "fsdp"}})
    assert info.value.body["param"] == "compute.sharding"
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, suffix="fsdp",
                                      method={"type": "lora", "lora": {"hyperparameters": hp()}},
                                      extra_body={"compute": {"workers": 2, "sharding": "fsdp"}})
    assert {k: v for k, v in job.model_extra["compute"].items() if k != "plan"} == {"workers": 2, "sharding": "fsdp"}
    job = wait_for(api, job.id, timeout=300)
    assert job.status == "succeeded", job.error
    metrics = job.model_extra["metrics"]
    assert metrics["valid_loss_after"] < metrics["valid_loss_before"]
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any("base model sharded over 2 workers (FSDP" in m for m in messages), messages
    assert api.fine_tuning.jobs.checkpoints.list(job.id).data  # gathered by both ranks, kept by rank 0
    out = state.catalog.export(None, CLI_CTX, job.fine_tuned_model, tmp_path / "export")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(state.catalog.get_base_model(tiny_model).path)
    PeftModel.from_pretrained(base, out)


def test_cancel_stops_every_rank_of_a_ray_job(client, state, tiny_model, trainer, owner, ray_cluster):
    train_id = upload(client, owner, [qa(i) for i in range(40)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, extra_body={"compute": {"workers": 2}},
                                      method={"type": "lora", "lora": {"hyperparameters": hp(n_epochs=100,
                                                                                             batch_size=2)}})
    deadline = Deadline(240)
    while not any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data):
        assert deadline, "the ranks never started training"
        time.sleep(0.5)
    stopped_in_time = Deadline(30)
    assert api.fine_tuning.jobs.cancel(job.id).status == "running"
    done = wait_for(api, job.id, timeout=60)
    assert done.status == "cancelled" and stopped_in_time
    assert state.scheduler.running() == []
    submitted = next(e for e in api.fine_tuning.jobs.list_events(job.id, limit=200).data
                     if e.message.startswith("Submitted to Ray as "))
    assert ray_cluster.client.get_job_status(submitted.data["ray_submission_id"]).is_terminal()
