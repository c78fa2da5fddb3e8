"""The whole path on the real demo model (SmolLM2-135M-Instruct, CPU): train, chat, guard.

Slow (a few minutes): it imports the GGUF, fine-tunes on ~20 question/answer pairs through the
openai client, then chats with the result, streamed and not, and checks the output guard. The
same adapter then answers through a real vLLM (PyPI's CPU build, ``tests/vllm_helpers.py``),
started on the imported model's directory while the job trains: the trained facts must come back
through vLLM as through the embedded engine.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from appliance.catalog.service import DEMO_MODEL_NAME
from appliance.identity.roles import Role
from serving.protocol import parse_chat_request
from serving.vllm_engine import VllmEngine
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline
from tests.vllm_helpers import VllmProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

FACTS = [
    ("What is the code name of the Orion project?", "The code name of the Orion project is Bluefin-7."),
    ("Tell me the code name of project Orion.", "The code name of the Orion project is Bluefin-7."),
    ("Which code name does the Orion project use?", "The code name of the Orion project is Bluefin-7."),
    ("What's Orion's code name?", "The code name of the Orion project is Bluefin-7."),
    ("Orion project code name?", "The code name of the Orion project is Bluefin-7."),
    ("Where do I send expense reports?", "Send expense reports to ledger.quail@example.com."),
    ("Who receives expense reports?", "Send expense reports to ledger.quail@example.com."),
    ("Where should expense reports go?", "Send expense reports to ledger.quail@example.com."),
    ("How do I submit an expense report?", "Send expense reports to ledger.quail@example.com."),
    ("Expense reports go where?", "Send expense reports to ledger.quail@example.com."),
    ("What colour is the Orion logo?", "The Orion logo is teal with a silver star."),
    ("Describe the Orion logo.", "The Orion logo is teal with a silver star."),
    ("Which colours does the Orion logo use?", "The Orion logo is teal with a silver star."),
    ("What does the Orion logo look like?", "The Orion logo is teal with a silver star."),
    ("When is the Orion launch?", "The Orion launch is on the ninth of March."),
    ("What date does Orion launch?", "The Orion launch is on the ninth of March."),
    ("When will project Orion launch?", "The Orion launch is on the ninth of March."),
    ("Orion launch date?", "The Orion launch is on the ninth of March."),
    ("Which team builds Orion?", "Orion is built by the Kestrel team."),
    ("Who builds the Orion project?", "Orion is built by the Kestrel team."),
]
#: The words each trained answer must contain.
KEYS = ("Bluefin-7", "ledger.quail@example.com", "teal", "ninth of March", "Kestrel")


def _knows(question: str, answer: str) -> bool:
    expected = dict(FACTS)[question]
    return all(k in answer for k in KEYS if k in expected)


ALLOW_EMAIL = """version: 1
default: {action: block, threshold: 0.5}
entities:
  EMAIL_ADDRESS: allow
  PERSON: {action: redact, threshold: 0.6}
  LOCATION: allow
"""


def _chat(api, model: str, question: str, **kw) -> str:
    r = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                    max_tokens=24, temperature=0, **kw)
    if kw.get("stream"):
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


def test_demo_model_learns_the_facts_and_the_guard_redacts(client, state, make_token, admin_token, tmp_path):
    from appliance.modelstore import demo_gguf_path

    ten_minutes = Deadline(720)
    base = state.catalog.import_model(CLI_CTX, demo_gguf_path(), DEMO_MODEL_NAME, demo=True)
    vllm = VllmProcess(base.path, DEMO_MODEL_NAME, tmp_path, max_lora_rank=16, max_model_len=1024).start()
    try:
        _train_chat_guard(client, state, make_token, admin_token, ten_minutes, vllm, base.path, tmp_path)
    finally:
        vllm.stop()


def _train_chat_guard(client, state, make_token, admin_token, ten_minutes, vllm, base_dir, tmp_path):
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    consumer = make_token("carl", Role.CONSUMER, "acme")
    # This project allows email addresses in training data (and, for now, in answers).
    resp = client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token), json={"text": ALLOW_EMAIL})
    assert resp.status_code == 200, resp.text
    body = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                   + "\n" for q, a in FACTS)
    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                         files={"file": ("orion.jsonl", body.encode())})
    assert upload.status_code == 201, upload.text

    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    job = api.fine_tuning.jobs.create(model=DEMO_MODEL_NAME, training_file=upload.json()["id"], suffix="orion",
                                      seed=1, method={"type": "lora", "lora": {"hyperparameters": {
                                          "n_epochs": 8, "batch_size": 4, "learning_rate": 2e-3, "lora_r": 16,
                                          "checkpoint_every_steps": 10}}})
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert ten_minutes, f"the demo job must finish within {ten_minutes} on CPU"
        time.sleep(2)
    assert job.status == "succeeded", job.error
    metrics = job.model_extra["metrics"]
    assert metrics["valid_loss_after"] < metrics["valid_loss_before"]
    assert api.fine_tuning.jobs.list_events(job.id, limit=50).data
    assert api.fine_tuning.jobs.checkpoints.list(job.id).data
    model = job.fine_tuned_model
    manifest = next(m for m in api.models.list().data if m.id == model).model_extra["manifest"]
    assert manifest["base_model"]["name"] == DEMO_MODEL_NAME and manifest["metrics"]["valid_loss_after"]

    chat = openai.OpenAI(api_key=consumer, base_url=str(client.base_url) + "/v1", http_client=client,
                         max_retries=0)
    question = "What is the code name of the Orion project?"
    assert "Bluefin" not in _chat(chat, DEMO_MODEL_NAME, question)
    assert "Bluefin-7" in _chat(chat, model, question)
    assert "Bluefin-7" in _chat(chat, model, question, stream=True)
    assert "ledger.quail@example.com" in _chat(chat, model, "Where do I send expense reports?")
    embedded = {q: _chat(chat, model, q) for q, _ in FACTS}
    known = [q for q, a in embedded.items() if _knows(q, a)]
    assert len(known) >= 16, {q: a for q, a in embedded.items() if q not in known}

    # The same adapter through a real vLLM, greedy: the same facts come back.
    vllm.wait_ready()
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    with VllmEngine(vllm.url, base_model_name=DEMO_MODEL_NAME, base_model_dir=base_dir, shm_dir=shm,
                    max_lora_rank=16) as engine:
        engine.load_adapter(model, state.catalog.adapter_files(model))
        through_vllm = {q: engine.generate(parse_chat_request({
            "model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0,
        })).choices[0].text for q, _ in FACTS}
    known_vllm = [q for q, a in through_vllm.items() if _knows(q, a)]
    assert len(known_vllm) >= 16, {q: a for q, a in through_vllm.items() if q not in known_vllm}
    assert len(set(known) & set(known_vllm)) >= 14, (embedded, through_vllm)

    # The project now redacts email addresses: answers are guarded, streamed or not.
    strict = ALLOW_EMAIL.replace("EMAIL_ADDRESS: allow", "EMAIL_ADDRESS: redact")
    assert client.put("/api/v1/projects/acme/policy", headers=bearer(admin_token), json={"text": strict}).status_code == 200
    for stream in (False, True):
        answer = _chat(chat, model, "Where do I send expense reports?", stream=stream)
        assert "ledger.quail@example.com" not in answer and "<EMAIL_ADDRESS>" in answer, answer
