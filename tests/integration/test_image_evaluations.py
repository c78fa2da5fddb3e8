"""Image-model evaluations end to end on the tiny Stable Diffusion pipeline and the tiny random CLIP evaluator:
a base model and a LoRA fine-tune compared on a test file of prompts in a sandboxed worker (the figures mean
nothing; the wiring, the seeds and who sees the images are what is checked)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from sqlalchemy import select

from appliance.audit.models import AuditEvent
from appliance.identity.models import Project
from tests.conftest import CLI_CTX, bearer
from tests.integration.test_evaluations import portal_headers, upload, wait_for
from tests.integration.test_jobs import owner, trainer  # noqa: F401 (fixtures)

PROMPTS = ["a photo of sks disc", "a red disc in the snow", "a blue square on a table"]
SETTINGS = {"images_per_prompt": 2, "num_inference_steps": 2, "seed": 3}


@pytest.fixture
def image_store(state, tmp_path, trainer) -> dict[str, str]:
    """The tiny image model, the tiny CLIP evaluator and a DreamBooth+LoRA fine-tune trained in a second, published."""
    from appliance.diffusion import build_tiny_sd_pipeline, train_images
    from appliance.diffusion.tiny import build_tiny_clip_model
    from tests.unit.diffusion.conftest import QUICK, disc_dataset, make_spec

    base_dir = build_tiny_sd_pipeline(tmp_path / "tiny-sd", seed=0)
    state.catalog.import_model(CLI_CTX, base_dir, "tiny-sd")
    state.catalog.import_model(CLI_CTX, build_tiny_clip_model(tmp_path / "clip", seed=0), "tiny-clip")
    files = train_images(make_spec("dreambooth_lora", **{**QUICK, "rank": 4}), base_dir, disc_dataset(),
                         sample_steps=1).artifacts
    adapter_id = "ft:tiny-sd:acme:disc:ftjob-imageeval"
    with state.db.transaction() as s:
        project = s.scalar(select(Project).where(Project.name == "acme"))
        state.catalog.publish(s, CLI_CTX, adapter_id=adapter_id, job_id="ftjob-imageeval", project=project,
                              base_model="tiny-sd", kind="dreambooth_lora", files=files,
                              manifest={"job_id": "ftjob-imageeval"})
    return {"base": "tiny-sd", "fine_tune": adapter_id}


def decoded(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def test_image_models_compared_on_prompts_and_other_shapes_refused(client, state, image_store, trainer, owner):
    models = [image_store["base"], image_store["fine_tune"]]
    test_file = upload(client, owner, [{"text": p} for p in PROMPTS], "evals")
    # each kind's options: a text model's option is refused on an image model, naming it
    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": models, "max_tokens": 8})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens", resp.text
    assert "applies to text models" in resp.json()["error"]["message"]
    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": models, "images_per_prompt": 9})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "images_per_prompt", resp.text
    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": models, "samples": 9})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "samples", resp.text

    resp = client.post("/v1/evaluations", headers=bearer(trainer),
                       json={"file": test_file, "models": models, "samples": 2, **SETTINGS})
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert created["kind"] == "diffusion" and created["images"] == SETTINGS and created["max_tokens"] is None
    done = wait_for(client, trainer, created["id"])
    assert done["status"] == "succeeded", done["error"]
    assert [r["model"] for r in done["results"]] == models
    for result in done["results"]:
        assert result["prompts"] == 3 and result["images"] == 6 and isinstance(result["clip_t"], float)
        assert result["loss"] is None
    assert done["fidelity"]["evaluators"] == {"clip": "tiny-clip"} and "CLIP-T" in done["fidelity"]["metric"]
    # The images are test-derived content: in the encrypted result file only, read by a role reading file content.
    assert not any(p in json.dumps(done) for p in PROMPTS)
    file_id = done["result_file"]
    assert client.get(f"/v1/files/{file_id}/content", headers=bearer(trainer)).status_code == 403
    report = client.get(f"/v1/files/{file_id}/content", headers=bearer(owner)).json()
    assert report["format"] == "appliance.image-evaluation/1" and report["models"] == models
    assert [s["prompt"] for s in report["samples"]] == PROMPTS[:2]
    assert [s["seeds"] for s in report["samples"]] == [[3, 4], [5, 6]]
    for sample in report["samples"]:
        assert set(sample["images"]) == set(models)
        assert all(decoded(b).format == "PNG" for m in models for b in sample["images"][m])
    first = report["samples"][0]["images"]
    assert first[models[0]][0] != first[models[1]][0]  # the fine-tune is applied to its own column only
    with state.db.read() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id.in_([created["id"], file_id]))
                                .order_by(AuditEvent.seq)))
    assert [e.action for e in events if e.resource_id == created["id"]][-3:] == [
        "evaluation.create", "evaluation.start", "evaluation.succeed"]
    assert [e.actor for e in events if e.action == "file.read_content"] == ["olivia"]
    assert events[-1].action == "file.read_content"
    assert not any(p in json.dumps([e.details for e in events]) for p in PROMPTS)
    isolation = next(e for e in events if e.action == "evaluation.succeed").details["worker_isolation"]
    assert isolation["level"] == "sandbox" and isolation["isolated"] is True, isolation

    # The portal: the figures (the best in bold) for everyone who reads jobs; the images for data owners only.
    html = client.get(f"/evaluations/{created['id']}", headers=portal_headers(state, "olivia")).text
    assert 'id="results"' in html and "<strong>" in html and 'id="fidelity"' in html and "tiny-clip" in html
    assert 'id="samples"' in html and html.count('<img class="sample" src="data:image/png;base64,') == 8
    assert PROMPTS[0] in html and "seeds 3, 4" in html
    reads = [e.actor for e in _reads(state, file_id)]
    assert reads == ["olivia", "olivia"]  # the page's read of the images is audited too
    html = client.get(f"/evaluations/{created['id']}", headers=portal_headers(state, "trish")).text
    assert 'id="results"' in html and 'id="samples-note"' in html and "data:image" not in html
    assert PROMPTS[0] not in html and "prompts and generated images" in html
    html = client.get("/models", headers=portal_headers(state, "trish")).text
    clip_t = done["results"][0]["clip_t"]
    assert f'href="/evaluations/{created["id"]}"' in html and f"CLIP-T {clip_t:.4f} · 6 images" in html

    # A test file of another shape fails naming the record (the worker reads it before loading any model).
    chat = {"messages": [{"role": "user", "content": "draw a disc"}, {"role": "assistant", "content": "ok"}]}
    bad_file = upload(client, owner, [{"text": PROMPTS[0]}, chat], "evals")
    created = client.post("/v1/evaluations", headers=bearer(trainer),
                          json={"file": bad_file, "models": [image_store["base"]], **SETTINGS}).json()
    failed = wait_for(client, trainer, created["id"])
    assert failed["status"] == "failed" and failed["error"]["param"] == "file[1].messages", failed
    assert "record 2 is a chat record" in failed["error"]["message"] and "draw a disc" not in failed["error"]["message"]
    assert failed["result_file"] is None

    # The form offers image models and sends an image model's options only; a queued one can be cancelled.
    state.evaluation_runner.stop()
    headers = portal_headers(state, "trish")
    html = client.get("/evaluations", headers=headers).text
    assert f'{image_store["fine_tune"]} (image)' in html and 'id="images_per_prompt"' in html
    resp = client.post("/evaluations", headers=headers, follow_redirects=False, data={
        "file": test_file, "model1": image_store["base"], "samples": "1", "max_tokens": "64",
        "images_per_prompt": "1", "num_inference_steps": "3", "seed": "7"})
    assert resp.status_code == 303, resp.text
    queued = client.get(f"/v1/evaluations/{resp.headers['location'].rsplit('/', 1)[1]}", headers=bearer(trainer)).json()
    assert queued["images"] == {"images_per_prompt": 1, "num_inference_steps": 3, "seed": 7}
    assert queued["max_tokens"] is None and queued["status"] == "queued"
    assert client.post(f"/v1/evaluations/{queued['id']}/cancel", headers=bearer(trainer)).json()["status"] == \
        "cancelled"


def _reads(state, file_id: str) -> list[AuditEvent]:
    with state.db.read() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.resource_id == file_id,
                                                       AuditEvent.action == "file.read_content")))
