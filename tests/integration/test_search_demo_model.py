"""A hyperparameter search on the real demo model (SmolLM2-135M-Instruct, CPU), end to end (issue 24).

Slow but short: 4 trials over 4 learning rates (sampler ``grid``: each value once), each trial an ordinary job
in a sandboxed worker, on 10 question/answer records (one held out for validation), 1 epoch of 2 steps, 64-token
sequences, no canaries and no extraction probe. What a job does after training and a request cannot turn off
stays: the validation pass and the sample generations (one held-out prompt here). The search must end with the
model of the trial of the least validation loss, which then answers a chat request through the API.

The demo GGUF is converted once into pytest's cache (``.pytest_cache/d/smollm2-135m``, about 25 s); later runs
import that folder, which takes a few seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from appliance.catalog.service import DEMO_MODEL_NAME
from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer
from tests.integration.test_jobs import api_for, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LEARNING_RATES = [5e-4, 1e-3, 2e-3, 4e-3]
SHELVES = ["north", "south", "east", "west", "upper", "lower"]


def _records(n: int) -> bytes:
    return "".join(json.dumps({"messages": [
        {"role": "user", "content": f"Where is part P-{100 + i} stored?"},
        {"role": "assistant", "content": f"Part P-{100 + i} is on the {SHELVES[i % len(SHELVES)]} shelf, bin {i % 7}."},
    ]}) + "\n" for i in range(n)).encode()


@pytest.fixture(scope="session")
def demo_model_dir(request, tmp_path_factory) -> Path:
    """The demo GGUF converted to a model folder, kept in pytest's cache between runs (keyed by the GGUF's size);
    in a temporary folder where the cache is off (``-p no:cacheprovider``)."""
    from appliance.modelstore import demo_gguf_path, import_model

    gguf = demo_gguf_path()
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("smollm2-135m")) if cache is not None else tmp_path_factory.mktemp("smollm2-135m")
    stamp = folder / "source.json"
    source = {"gguf": gguf.name, "bytes": gguf.stat().st_size}
    if not (folder / "model" / "config.json").is_file() or not stamp.is_file() \
            or json.loads(stamp.read_text()) != source:
        shutil.rmtree(folder / "model", ignore_errors=True)
        import_model(gguf, folder / "model", "smollm2-135m")
        stamp.write_text(json.dumps(source))
    return folder / "model"


def test_a_search_on_the_demo_model_ends_with_the_least_validation_loss_and_its_model_answers(
        client, state, make_token, demo_model_dir):
    state.catalog.import_model(CLI_CTX, demo_model_dir, DEMO_MODEL_NAME, demo=True)
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    consumer = make_token("carl", Role.CONSUMER, "acme")
    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                         files={"file": ("parts.jsonl", _records(10))})
    assert upload.status_code == 201, upload.text
    resp = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer), json={
        "model": DEMO_MODEL_NAME, "training_file": upload.json()["id"], "seed": 1,
        "memorization": {"extraction_probe": False, "canaries": 0},
        "method": {"type": "lora", "lora": {"hyperparameters": {
            "learning_rate": {"choice": LEARNING_RATES}, "n_epochs": 1, "batch_size": 8, "lora_r": 8,
            "max_seq_length": 64, "checkpoint_every_steps": 0}}},
        "search": {"trials": 4, "max_seconds": 1800, "sampler": "grid", "early_stopping": "none"}})
    assert resp.status_code == 200, resp.text
    api = api_for(client, trainer)
    job = wait_for(api, resp.json()["id"], timeout=600)
    assert job.status == "succeeded", job.error

    table = job.model_extra["search"]["trial_table"]
    assert sorted(r["params"]["learning_rate"] for r in table) == LEARNING_RATES  # each value once
    trials = {r["number"]: api.fine_tuning.jobs.retrieve(r["job_id"]) for r in table}
    assert all(t.status == "succeeded" for t in trials.values()), {n: t.error for n, t in trials.items()}
    losses = {n: t.model_extra["metrics"]["valid_loss_after"] for n, t in trials.items()}
    assert all(r["state"] == "complete" and r["value"] == losses[r["number"]] for r in table), table
    best = job.model_extra["search"]["best_trial"]
    assert losses[best] == min(losses.values()), losses
    assert job.fine_tuned_model == trials[best].fine_tuned_model
    assert job.model_extra["metrics"]["valid_loss_after"] == losses[best]
    manifest = next(m for m in api.models.list().data if m.id == job.fine_tuned_model).model_extra["manifest"]
    assert manifest["base_model"]["name"] == DEMO_MODEL_NAME

    chat = openai.OpenAI(api_key=consumer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    answer = chat.chat.completions.create(model=job.fine_tuned_model, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": "Where is part P-103 stored?"}])
    assert answer.model == job.fine_tuned_model and answer.choices[0].message.content.strip(), answer
