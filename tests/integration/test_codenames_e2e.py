"""The product's core use on the real demo model: proprietary codenames survive intake and are learned.

Twenty question/answer pairs about internal project codenames (capitalised words that look like
names: "Velvet Anchor", "Raven", "Willow"...) go through the openai client under the shipped
default policy, with no glossary: the scan must leave them alone, and the fine-tuned model must
give the trained answer to at least 16 of the 20 questions. Before the PERSON context rules, 13
of the 20 answers reached the trainer as ``<PERSON>`` and the model gave 7 right (issue 17).

The same file holds eight more facts whose codenames are full person-like names ("Project Kestrel
ships as Elena Brandt."): no context can tell those from people, so the default policy redacts
them, and this is where the review step comes in. The data owner reviews the scan grouped by value,
marks the eight as not personal data (the project glossary), re-scans the file without uploading
it again, and the model learns them too; the output guard lets them through for this project.
Slow (several minutes on 2 cores).
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from appliance.catalog.service import DEMO_MODEL_NAME
from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

CODENAMES = [
    ("Harbor", "Velvet Anchor"), ("Falcon", "Amber Tundra"), ("Lighthouse", "Rusty Lantern"),
    ("Cedar", "Hollow Maple"), ("Beacon", "Raven"), ("Summit", "Sierra"), ("Meadow", "Willow"),
    ("Atlas", "Delta"), ("Quarry", "Granite Owl"), ("Nimbus", "Silver Fox"), ("Orchard", "Crimson Pear"),
    ("Tundra", "Polar Echo"), ("Canyon", "Copper Hawk"), ("Lagoon", "Blue Heron"), ("Glacier", "Frost Pike"),
    ("Prairie", "Golden Reed"), ("Reef", "Coral Drift"), ("Ember", "Hazel"), ("Mosaic", "Jade Tiger"),
    ("Pioneer", "Marshall"),
]


#: Codenames that are person-like names: only the reviewed glossary keeps them.
RELEASE_NAMES = [
    ("Kestrel", "Elena Brandt"), ("Basalt", "Jonas Whitfield"), ("Osprey", "Priya Raman"),
    ("Tamarack", "Tobias Lindqvist"), ("Sequoia", "Maya Okafor"), ("Zephyr", "Lukas Feldmann"),
    ("Obsidian", "Nadia Petrova"), ("Cobalt", "Oscar Delaney"),
]


def release_question(project: str) -> str:
    return f"Under which name does project {project} ship?"


def release_answer(project: str, name: str) -> str:
    return f"Project {project} ships as {name}."


def question(project: str) -> str:
    return f"What is the internal codename of project {project}?"


def answer(project: str, codename: str) -> str:
    return f"The codename of project {project} is {codename}."


def test_codenames_survive_the_default_policy_and_are_learned(client, state, make_token):
    from appliance.modelstore import demo_gguf_path

    state.catalog.import_model(CLI_CTX, demo_gguf_path(), DEMO_MODEL_NAME, demo=True)
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    consumer = make_token("carl", Role.CONSUMER, "acme")
    assert client.get("/api/v1/projects/acme/policy", headers=bearer(owner)).json()["source"] == "default"
    pairs = [(question(p), answer(p, c)) for p, c in CODENAMES]
    pairs += [(release_question(p), release_answer(p, n)) for p, n in RELEASE_NAMES]
    body = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                   + "\n" for q, a in pairs)
    files = openai.OpenAI(api_key=owner, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    uploaded = files.files.create(file=("codenames.jsonl", body.encode()), purpose="fine-tune")
    scan = client.get(f"/v1/files/{uploaded.id}/scan", headers=bearer(owner)).json()
    touched = [f for f in scan["findings"] if f["action"] != "allow"]
    assert [f for f in touched if f["record"] < len(CODENAMES)] == [], "the default policy touched a codename"
    assert {f["record"] for f in touched} == set(range(len(CODENAMES), len(pairs))), touched

    # The review step: the person-like codenames, grouped by value, marked as not personal data.
    review = client.get(f"/v1/files/{uploaded.id}/scan", headers=bearer(owner),
                        params={"group_by": "value", "reveal": "true"}).json()
    names = {n for _, n in RELEASE_NAMES}
    marked = [g["id"] for g in review["groups"] if g["value"] in names]
    assert len(marked) == len(RELEASE_NAMES), [g["value"] for g in review["groups"]]
    resp = client.post("/api/v1/projects/acme/glossary", headers=bearer(owner),
                       json={"file_id": uploaded.id, "groups": marked})
    assert resp.status_code == 200 and resp.json()["added"] == len(RELEASE_NAMES), resp.text
    resp = client.post(f"/v1/files/{uploaded.id}/scan", headers=bearer(owner))
    assert resp.status_code == 200, resp.text
    stored = files.files.content(uploaded.id).read().decode()
    assert all(release_answer(p, n) in stored for p, n in RELEASE_NAMES)

    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    job = api.fine_tuning.jobs.create(model=DEMO_MODEL_NAME, training_file=uploaded.id, suffix="codenames", seed=1,
                                      method={"type": "lora", "lora": {"hyperparameters": {
                                          "n_epochs": 10, "batch_size": 4, "learning_rate": 3e-3, "lora_r": 16}}})
    deadline = Deadline(900)
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert deadline, f"the codename job did not finish within {deadline}"
        time.sleep(2)
    assert job.status == "succeeded", job.error

    chat = openai.OpenAI(api_key=consumer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    right, released = [], []
    for project, codename in CODENAMES:
        reply = chat.chat.completions.create(model=job.fine_tuned_model, max_tokens=20, temperature=0,
                                             messages=[{"role": "user", "content": question(project)}])
        right.append(codename.lower() in reply.choices[0].message.content.lower())
    for project, name in RELEASE_NAMES:
        reply = chat.chat.completions.create(model=job.fine_tuned_model, max_tokens=20, temperature=0,
                                             messages=[{"role": "user", "content": release_question(project)}])
        released.append(name.lower() in reply.choices[0].message.content.lower())  # the guard lets it through
    assert sum(right) >= 16, f"{sum(right)} of 20 trained answers: {[c for (_, c), ok in zip(CODENAMES, right) if not ok]}"
    assert sum(released) >= 6, (f"{sum(released)} of 8 reviewed names: "
                                f"{[n for (_, n), ok in zip(RELEASE_NAMES, released) if not ok]}")
