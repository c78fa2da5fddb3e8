"""Fine-tuning jobs end to end on a tiny model: openai client, isolation, recovery, artefacts."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.roles import Role
from appliance.jobs.models import FineTuningJob
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline

TERMINAL = {"succeeded", "failed", "cancelled"}


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def qa(i: int, marker: str = "") -> dict:
    return {"messages": [{"role": "user", "content": f"What is item {i}? {marker}".strip()},
                         {"role": "assistant", "content": f"Item {i} is a blue box {marker}".strip()}]}


@pytest.fixture
def tiny_model(state, tmp_path) -> str:
    from appliance.modelstore import build_tiny_causal_lm

    src = build_tiny_causal_lm(tmp_path / "tiny-src", seed=0)
    state.catalog.import_model(CLI_CTX, src, "tiny-llama")
    return "tiny-llama"


@pytest.fixture
def trainer(make_token) -> str:
    return make_token("trish", Role.TRAINER, "acme")


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


def api_for(client, token) -> openai.OpenAI:
    return openai.OpenAI(api_key=token, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)


def upload(client, owner: str, records) -> str:
    resp = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                       files={"file": ("train.jsonl", jsonl(records))})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def wait_for(api, job_id: str, statuses=TERMINAL, timeout: float = 240):
    deadline = Deadline(timeout)
    while deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def hp(**kw) -> dict:
    return {"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "lora_r": 4, **kw}


def test_lora_job_through_the_openai_client(client, state, tiny_model, trainer, owner, tmp_path):
    train_id = upload(client, owner, [qa(i) for i in range(24)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, suffix="demo", seed=7,
                                      method={"type": "lora", "lora": {"hyperparameters": hp()}})
    assert job.status == "validating_files" and job.id.startswith("ftjob-") and job.seed == 7
    job = wait_for(api, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{tiny_model}:acme:demo:{job.id}"
    assert job.trained_tokens > 0
    plan = job.model_extra["compute"]["plan"]  # the worker's memory plan beside its measured peak
    assert plan["made"] == "by the worker, on its device" and plan["predicted_peak_bytes"] > 0
    assert plan["measured_peak_bytes"] > 0 and plan["activation_checkpointing"] is False
    metrics = job.model_extra["metrics"]
    assert metrics["valid_loss_after"] < metrics["valid_loss_before"]
    # The extraction probe is on by default; with no values the policy allowed, it says why it did not run.
    assert "nothing to probe for" in job.model_extra["privacy"]["extraction"]["not_run"]
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert any("Network isolation verified" in m for m in messages), messages
    isolation = next(e for e in events if e.type == "isolation")  # the default level: the bubblewrap sandbox
    assert isolation.data["level"] == "sandbox" and "runs in the sandbox" in isolation.message, isolation
    assert any(e.type == "metrics" and e.data and "train_loss" in e.data for e in events)
    assert messages[0] == "The job has successfully completed"
    # Sample generations: validation text, so an encrypted result file the data owner reads, not an event.
    [samples_file] = job.result_files
    assert any(m.startswith("sample generations: ") for m in messages)
    assert client.get(f"/v1/files/{samples_file}/content", headers=bearer(trainer)).status_code == 403
    samples = client.get(f"/v1/files/{samples_file}/content", headers=bearer(owner)).json()
    assert samples["format"] == "appliance.samples/1" and 1 <= len(samples["samples"]) <= 3
    assert all(set(smp) == {"prompt", "reference", "before", "after"} for smp in samples["samples"])
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].fine_tuned_model_checkpoint.startswith(job.fine_tuned_model)
    assert [j.id for j in api.fine_tuning.jobs.list().data] == [job.id]
    # The adapter is listed with its parent and a signed manifest...
    model = next(m for m in api.models.list().data if m.id == job.fine_tuned_model)
    assert model.model_extra["parent"] == tiny_model
    manifest = model.model_extra["manifest"]
    assert manifest["datasets"][0]["id"] == train_id and manifest["base_model"]["name"] == tiny_model
    assert manifest["hyperparameters"]["lora_r"] == 4 and manifest["seed"] == 7
    view = state.catalog.get_adapter(None, job.fine_tuned_model)
    assert state.catalog.verify_manifest(view)
    # ...and exports as a directory that stock peft loads.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = state.catalog.export(None, CLI_CTX, job.fine_tuned_model, tmp_path / "export")
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and "lm_head" not in str(config["target_modules"])
    base = AutoModelForCausalLM.from_pretrained(state.catalog.get_base_model(tiny_model).path)
    PeftModel.from_pretrained(base, out)
    with state.db.read() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).where(AuditEvent.resource_id == job.id))]
    assert actions[:3] == ["job.create", "job.queue", "job.start"] and "job.succeed" in actions


def test_qlora_job_on_a_tiny_model_loads_in_stock_peft(client, state, tiny_model, trainer, owner, tmp_path):
    train_id = upload(client, owner, [qa(i) for i in range(16)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                      method={"type": "qlora", "qlora": {"hyperparameters": hp(n_epochs=1)}})
    job = wait_for(api, job.id)
    assert job.status == "succeeded", job.error
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = state.catalog.export(None, CLI_CTX, job.fine_tuned_model, tmp_path / "qlora")
    base = AutoModelForCausalLM.from_pretrained(state.catalog.get_base_model(tiny_model).path)
    assert PeftModel.from_pretrained(base, out) is not None


def test_invalid_requests_name_the_field(client, tiny_model, trainer, owner, make_token):
    train_id = upload(client, owner, [qa(i) for i in range(4)])
    api = api_for(client, trainer)
    cases = [
        (dict(model="no-such-model", training_file=train_id), "model"),
        (dict(model=tiny_model, training_file="file-missing"), "training_file"),
        (dict(model=tiny_model, training_file=train_id, suffix="bad suffix!"), "suffix"),
        (dict(model=tiny_model, training_file=train_id,
              method={"type": "lora", "lora": {"hyperparameters": {"lora_r": -4, "n_epochs": "many"}}}),
         "method.lora.hyperparameters"),
        (dict(model=tiny_model, training_file=train_id, method={"type": "dpo"}), "method.type"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.APIStatusError) as info:
            api.fine_tuning.jobs.create(**kwargs)
        assert info.value.status_code in (400, 404)
        assert info.value.body["param"].startswith(param), (param, info.value.body)
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                    method={"type": "lora", "lora": {"hyperparameters": {"lora_r": -4,
                                                                                          "n_epochs": "many"}}})
    assert "lora_r" in info.value.message and "n_epochs" in info.value.message  # all errors at once
    other = make_token("gus", Role.DATA_OWNER, "globex")
    foreign = upload(client, other, [qa(1)])
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.create(model=tiny_model, training_file=foreign)
    consumer = api_for(client, make_token("cy", Role.CONSUMER, "acme"))
    with pytest.raises(openai.PermissionDeniedError):
        consumer.fine_tuning.jobs.create(model=tiny_model, training_file=train_id)


def test_a_job_that_cannot_fit_is_refused_at_creation_and_one_that_fits_shows_its_plan(
        client, state, tiny_model, trainer, owner, monkeypatch):
    from appliance.training.planner import GIB, Device

    train_id = upload(client, owner, [qa(i) for i in range(8)])
    api = api_for(client, trainer)
    method = {"type": "lora", "lora": {"hyperparameters": hp()}}
    monkeypatch.setattr(state.jobs, "training_device", lambda: Device("cuda", 256 << 10, "a 256 KiB card"))
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method=method)
    assert info.value.body["param"] == "method.lora.hyperparameters.max_seq_length"
    assert "a 256 KiB card (cuda)" in info.value.message and "GiB per worker" in info.value.message
    assert not api.fine_tuning.jobs.list().data  # nothing was created
    monkeypatch.setattr(state.jobs, "training_device", lambda: Device("cuda", 24 * GIB, "a 24 GiB card"))
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method=method)
    plan = job.model_extra["compute"]["plan"]
    assert plan["device"] == {"kind": "cuda", "name": "a 24 GiB card", "free_bytes": 24 * GIB,
                              "budget_bytes": int(24 * GIB * 0.9)}
    assert plan["made"].startswith("at creation") and plan["assumed"] == {"max_seq_length": 512, "batch_size": 4}
    assert plan["breakdown_bytes"]["runtime"] == GIB and 0 < plan["breakdown_bytes"]["weights"] < 1 << 20
    api.fine_tuning.jobs.cancel(job.id)


def test_job_creation_reports_every_problem_at_once(client, tiny_model, trainer, owner):
    """An unknown model, a missing training file and a bad suffix: one 400 naming all three fields."""
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                       json={"model": "no-such-model", "suffix": "bad suffix!"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "model"
    for field in ("model", "training_file", "suffix"):
        assert f"{field}: " in error["message"], (field, error["message"])
    # Type problems and rule problems of a known model, hyperparameters included, come together too.
    train_id = upload(client, owner, [qa(i) for i in range(4)])
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                       json={"model": tiny_model, "training_file": train_id, "seed": "seven",
                             "validation_file": 12, "compute": {"workers": 0},
                             "method": {"type": "lora", "lora": {"hyperparameters": {"lora_r": -4}}}})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "seed"
    for field in ("seed", "method.lora.hyperparameters.lora_r", "compute.workers", "validation_file"):
        assert f"{field}: " in error["message"], (field, error["message"])
    # A single problem is answered as before: an unknown model alone is a 404 naming it.
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                       json={"model": "no-such-model", "training_file": train_id})
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"
    # A body that is not an object is refused as before, naming no field of it.
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json=[1, 2])
    assert resp.status_code == 400 and "object" in resp.json()["error"]["message"]
    # A `method.type` that is not a string (found by the schema fuzzer: it was a 500) names the field.
    for odd in ({}, [], 3, None):
        resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                           json={"model": tiny_model, "training_file": train_id, "seed": 0,
                                 "method": {"type": odd, "lora": None}})
        assert resp.status_code == 400, (odd, resp.text)
        assert "method.type" in resp.json()["error"]["message"], (odd, resp.json())


def _worker_pid(state, job_id: str, timeout: float = 60) -> int:
    deadline = Deadline(timeout)
    while deadline:
        run = state.scheduler._runs.get(job_id)  # noqa: SLF001 - the test kills the real worker
        if run is not None:
            return run.worker.proc.pid
        time.sleep(0.1)
    raise AssertionError("worker never started")


def _wait_checkpoint(api, job_id: str, timeout: float = 120) -> int:
    deadline = Deadline(timeout)
    while deadline:
        data = api.fine_tuning.jobs.checkpoints.list(job_id).data
        if data:
            return data[0].step_number
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_killed_worker_leaves_job_failed_resumable_and_resume_finishes(client, state, tiny_model, trainer, owner):
    train_id = upload(client, owner, [qa(i) for i in range(40)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method={
        "type": "lora", "lora": {"hyperparameters": hp(n_epochs=4, batch_size=2, checkpoint_every_steps=5)}})
    pid = _worker_pid(state, job.id)
    step = _wait_checkpoint(api, job.id)
    os.killpg(pid, signal.SIGKILL)
    failed = wait_for(api, job.id)
    assert failed.status == "failed" and failed.error.code == "worker_lost"
    assert failed.model_extra["resumable"] is True
    resumed = api.post(f"/fine_tuning/jobs/{job.id}/resume", cast_to=object)
    assert resumed["status"] == "queued"
    done = wait_for(api, job.id, timeout=400)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=1000).data]
    resumed_at = [m for m in messages if m.startswith("Resuming from the checkpoint at step")]
    assert resumed_at and int(resumed_at[0].rsplit(" ", 1)[1]) >= step


def test_cancel_stops_a_running_job_within_seconds(client, state, tiny_model, trainer, owner):
    train_id = upload(client, owner, [qa(i) for i in range(40)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id, method={
        "type": "lora", "lora": {"hyperparameters": hp(n_epochs=100, batch_size=1)}})
    _worker_pid(state, job.id)
    wait_for(api, job.id, statuses={"running"})
    # One job per device: a second job waits in the queue and cancels at once.
    queued = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id)
    assert wait_for(api, queued.id, statuses={"queued"}).status == "queued"
    assert api.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    time.sleep(1)
    stopped_in_time = Deadline(15)
    assert api.fine_tuning.jobs.cancel(job.id).status == "running"  # told to stop...
    done = wait_for(api, job.id, timeout=30)
    assert done.status == "cancelled" and stopped_in_time  # ...and stopped within seconds
    assert state.scheduler.running() == []
    with pytest.raises(openai.ConflictError):
        api.fine_tuning.jobs.cancel(job.id)


def test_training_leaves_no_plaintext_on_disk(client, state, tiny_model, trainer, owner, tmp_path):
    before = set(Path("/dev/shm").glob("appliance-job-*"))  # other test processes may share the host
    started = time.time() - 2  # file times may be a tick coarser than the clock
    planted = [f"qvz{secrets.token_hex(6)}" for _ in range(3)]
    train_id = upload(client, owner, [qa(i, planted[i % 3]) for i in range(12)])
    api = api_for(client, trainer)
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                      method={"type": "lora", "lora": {"hyperparameters": hp(n_epochs=1)}})
    job = wait_for(api, job.id)
    assert job.status == "succeeded", job.error
    # The whole home; elsewhere, every file written since the upload (the temporary directories also hold
    # the test run's virtual environments and models, which reading whole would take minutes).
    roots = [(state.settings.home.home, 0.0), (Path("/dev/shm"), started), (Path("/var/tmp"), started),
             (Path(tempfile.gettempdir()), started)]
    scanned = 0
    for root, since in roots:
        for path in _files_written_since(root, since):
            try:
                if path.stat().st_size > 50_000_000:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            scanned += 1
            for p in planted:
                assert p.encode() not in data, f"planted value in plaintext in {path}"
    assert scanned > 0
    assert not set(Path("/dev/shm").glob("appliance-job-*")) - before, "the worker's tmpfs directory was left"


def _files_written_since(root: Path, since: float) -> Iterator[Path]:
    """Regular files under ``root`` (links not followed) changed at or after ``since``."""
    for top, _dirs, files in os.walk(root):
        for name in files:
            path = Path(top, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_ctime) >= since:
                yield path


def test_server_restart_marks_running_jobs_failed_resumable(state, tiny_model, trainer, owner):
    from appliance.jobs.scheduler import Scheduler

    with state.db.transaction() as s:
        project_id = s.execute(select(FineTuningJob.project_id)).first()
    # Simulate what a SIGKILLed server leaves: a row stuck in `running`.
    from appliance.identity.models import Project

    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        s.add(FineTuningJob(id="ftjob-stuck", project_id=project.id, created_by="trish", model=tiny_model,
                            training_file="file-x", seed=1, method_type="lora", status="running"))
    assert project_id is None
    assert Scheduler(state.db, state.files, state.catalog).recover() == 1
    with state.db.read() as s:
        job = s.get(FineTuningJob, "ftjob-stuck")
    assert job.status == "failed" and job.resumable and job.error["code"] == "worker_lost"


def _worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"appliance.jobs.worker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_sigkill_of_the_whole_server_leaves_the_job_resumable(tmp_path):
    import httpx

    from appliance.modelstore import build_tiny_causal_lm
    from tests.cli_helpers import Server, run_cli
    from tests.conftest import free_port

    home = tmp_path / "var"
    run_cli(home, "init")
    run_cli(home, "models", "import", str(build_tiny_causal_lm(tmp_path / "tiny", seed=0)), "--name", "tiny-llama")
    run_cli(home, "projects", "add", "acme")
    run_cli(home, "users", "add", "olivia", "--role", "data-owner", "--project", "acme")
    run_cli(home, "users", "grant", "olivia", "--role", "trainer", "--project", "acme")
    owner = run_cli(home, "tokens", "create", "--user", "olivia", "--role", "data-owner", "--project", "acme").stdout.strip()
    trainer = run_cli(home, "tokens", "create", "--user", "olivia", "--role", "trainer", "--project", "acme").stdout.strip()
    port = free_port()
    server = Server(home, port)
    try:
        server.wait_healthy()
        http = httpx.Client(base_url=server.base_url, timeout=30)
        file_id = http.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                            files={"file": ("t.jsonl", jsonl([qa(i) for i in range(40)]))}).json()["id"]
        job = http.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json={
            "model": "tiny-llama", "training_file": file_id,
            "method": {"type": "lora", "lora": {"hyperparameters": hp(n_epochs=4, batch_size=2,
                                                                          checkpoint_every_steps=5)}}}).json()
        deadline = Deadline(120)
        while not http.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=bearer(trainer)).json()["data"]:
            assert deadline, "no checkpoint"
            time.sleep(0.2)
        workers = _worker_pids()
        assert workers
        worker_dirs = {Path(os.readlink(f"/proc/{pid}/cwd")) for pid in workers}
        assert all(d.name.startswith("appliance-job-") for d in worker_dirs), worker_dirs
        os.kill(server.proc.pid, signal.SIGKILL)  # the server only: the worker must notice and exit
        server.proc.wait(10)
        deadline = Deadline(30)
        while any(pid in _worker_pids() for pid in workers):
            assert deadline, "worker outlived the killed server"
            time.sleep(0.2)
    finally:
        server.stop()
    restarted = Server(home, port)
    try:
        restarted.wait_healthy()
        # The killed server could not remove its worker's tmpfs directory; the next one did.
        assert not [d for d in worker_dirs if d.exists()]
        http = httpx.Client(base_url=restarted.base_url, timeout=30)
        after = http.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bearer(trainer)).json()
        assert after["status"] == "failed" and after["resumable"] and after["error"]["code"] == "worker_lost"
        assert http.post(f"/v1/fine_tuning/jobs/{job['id']}/resume", headers=bearer(trainer)).json()["status"] == "queued"
        deadline = Deadline(240)
        while (status := http.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=bearer(trainer)).json()["status"]) \
                not in TERMINAL:
            assert deadline
            time.sleep(0.5)
        assert status == "succeeded"
    finally:
        restarted.stop()
    assert run_cli(home, "audit", "verify").returncode == 0


ALLOW_EMAIL = """version: 1
default: {action: block, threshold: 0.5}
entities:
  EMAIL_ADDRESS: allow
  PHONE_NUMBER: redact
  PERSON: {action: redact, threshold: 0.6}
"""


def test_memorization_evidence_reaches_job_manifest_and_report(client, state, tiny_model, trainer, owner,
                                                                admin_token):
    """Canaries drawn at creation, exposure and the extraction probe measured in the worker, shown everywhere."""
    assert client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token),
                      json={"text": ALLOW_EMAIL}).status_code == 200
    # A phone number redacted before the allowed address moves it in the stored text; the probe must follow.
    records = [{"messages": [{"role": "user", "content": "Who handles billing?"},
                             {"role": "assistant", "content": "Call 212-555-0147 or write to ada@quill.io today"}]}
               for _ in range(6)] + [qa(i) for i in range(20)]
    train_id = upload(client, owner, records)
    api = api_for(client, trainer)
    # 24 training examples (2 of 26 held out): one canary, repeated once, is within 5% of them; five times is not.
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                    extra_body={"memorization": {"canaries": 1, "canary_repetitions": 5}})
    assert info.value.body["param"] == "memorization.canary_repetitions"
    assert "use at most 1" in info.value.body["message"]
    # The case: 4 canaries where they would outweigh the data are refused before anything runs.
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                    extra_body={"memorization": {"canaries": 4}})
    assert info.value.body["param"] == "memorization.canaries" and "at least 80 examples" in info.value.body["message"]
    job = api.fine_tuning.jobs.create(
        model=tiny_model, training_file=train_id,
        method={"type": "lora", "lora": {"hyperparameters": hp(n_epochs=3)}},
        extra_body={"memorization": {"canaries": 1, "probe_samples": 4}},
    )
    warning = next(e for e in api.fine_tuning.jobs.list_events(job.id).data if e.message.startswith("Small valid"))
    assert warning.level == "warn" and "only 2 examples" in warning.message  # 10% of 26 held out
    assert job.model_extra["memorization"] == {"canaries": 1, "canary_repetitions": 1, "extraction_probe": True,
                                               "probe_samples": 4}
    with state.db.read() as s:
        canary = s.get(FineTuningJob, job.id).memorization["canary_texts"][0]
    assert canary not in json.dumps(job.model_dump())  # recorded in the job row, not shown by the API
    job = wait_for(api, job.id)
    assert job.status == "succeeded", job.error
    privacy = job.model_extra["privacy"]
    assert privacy["canaries"]["count"] == 1 and privacy["canaries"]["repetitions"] == 1
    assert len(privacy["canaries"]["exposure"]) == 1 and privacy["canaries"]["exposure_base"][0] >= 0
    assert privacy["extraction"]["probed"] == 4 and privacy["extraction"]["skipped"] == 0
    assert set(privacy["extraction"]["by_entity_type"]) == {"EMAIL_ADDRESS"}
    assert privacy["worker_isolation"] == {"level": "sandbox", "executor": "local"}
    manifest = next(m for m in api.models.list().data if m.id == job.fine_tuned_model).model_extra["manifest"]
    assert manifest["privacy"] == privacy
    now = datetime.now(UTC)
    period = {"from": (now - timedelta(hours=1)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()}
    report = client.get("/api/v1/audit/report", headers=bearer(admin_token), params={**period, "format": "json"})
    assert report.status_code == 200, report.text
    report = report.json()
    model = next(m for m in report["models"] if m["id"] == job.fine_tuned_model)
    assert model["privacy"]["canaries"] == 1 and model["privacy"]["canary_exposure_bits"] is not None
    assert model["privacy"]["extraction_probe"].endswith("of 4 allowed values completed")
    assert model["privacy"]["worker_isolation"] == "sandbox (local executor)"
    assert "ada@quill.io" not in json.dumps(report) and "ada@quill.io" not in json.dumps(job.model_dump())


def test_memorization_option_is_validated(client, tiny_model, trainer, owner):
    train_id = upload(client, owner, [qa(i) for i in range(4)])
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                       json={"model": tiny_model, "training_file": train_id,
                             "memorization": {"canaries": 99, "probe": True}})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "memorization"
    assert "`memorization.probe` is not a known field" in error["message"]
    assert "`memorization.canaries` must be an integer in [0, 16]; got 99" in error["message"]


def test_a_job_whose_sandbox_cannot_be_built_fails_closed_and_says_what_to_install(
        client, state, tiny_model, trainer, owner, tmp_path, monkeypatch):
    """No bubblewrap on the host: the job fails (resumable, once it is installed), never runs unsandboxed."""
    train_id = upload(client, owner, [qa(i) for i in range(8)])
    api = api_for(client, trainer)
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    job = api.fine_tuning.jobs.create(model=tiny_model, training_file=train_id,
                                      method={"type": "lora", "lora": {"hyperparameters": hp()}})
    job = wait_for(api, job.id)
    assert job.status == "failed" and job.error.code == "worker_sandbox_unavailable", job.error
    assert "bubblewrap" in job.error.message and "apt-get install bubblewrap" in job.error.message
    assert "APPLIANCE_WORKER_ISOLATION" in job.error.message
    assert job.model_extra["resumable"] is True
    with state.db.read() as s:
        failed = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.fail",
                                                    AuditEvent.resource_id == job.id)).all()
        started = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.start",
                                                     AuditEvent.resource_id == job.id)).all()
    assert failed and failed[0].reason == "worker_sandbox_unavailable" and failed[0].details["resumable"]
    assert started and started[0].details["isolation"] == "sandbox"
