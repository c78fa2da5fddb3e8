"""CLIP/DINO fidelity evaluators end to end: imported into the store, refused for serving and training,
and scoring an image job before and after training (tiny random evaluators: the figures mean nothing,
the wiring is what is checked)."""

from __future__ import annotations

import io
import time
import zipfile

import openai
import pytest
from PIL import Image, ImageDraw

from appliance.catalog.service import DEMO_IMAGE_MODEL_NAME
from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer
from tests.timing import Deadline

PROMPT = "a photo of sks disc"


def disc_zip(n: int = 2, size: int = 32) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            img = Image.new("RGB", (size, size), "white")
            ImageDraw.Draw(img).ellipse((4 + i, 4, size - 4, size - 4 - i), fill=(220, 20, 20))
            png = io.BytesIO()
            img.save(png, "PNG")
            z.writestr(f"disc{i}.png", png.getvalue())
    return buf.getvalue()


@pytest.fixture
def store(state, tmp_path) -> dict[str, str]:
    from appliance.diffusion import build_tiny_sd_pipeline
    from appliance.diffusion.tiny import build_tiny_clip_model, build_tiny_dino_model

    state.catalog.import_model(CLI_CTX, build_tiny_sd_pipeline(tmp_path / "tiny-sd", seed=0), DEMO_IMAGE_MODEL_NAME)
    state.catalog.import_model(CLI_CTX, build_tiny_clip_model(tmp_path / "clip", seed=0), "tiny-clip")
    state.catalog.import_model(CLI_CTX, build_tiny_dino_model(tmp_path / "dino", seed=0), "tiny-dino")
    return {"image": DEMO_IMAGE_MODEL_NAME, "clip": "tiny-clip", "dino": "tiny-dino"}


def test_evaluators_are_listed_audited_and_refused_for_serving_and_training(client, state, store, make_token,
                                                                             admin_token):
    from sqlalchemy import select

    from appliance.audit.models import AuditEvent

    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    models = {m["id"]: m for m in client.get("/v1/models", headers=bearer(trainer)).json()["data"]}
    assert models["tiny-clip"]["kind"] == models["tiny-dino"]["kind"] == "evaluator"
    assert client.get("/v1/models/tiny-clip", headers=bearer(trainer)).json()["kind"] == "evaluator"
    with state.db.read() as s:
        audited = {e.resource_id: e.details for e in s.scalars(select(AuditEvent).where(
            AuditEvent.action == "model.import"))}
    assert audited["tiny-clip"]["kind"] == "evaluator" and audited["tiny-clip"]["architecture"] == "CLIPModel"
    assert audited["tiny-dino"]["family"] == "dino" and audited["tiny-dino"]["content_hash"].startswith("sha256:")

    chat = client.post("/v1/chat/completions", headers=bearer(admin_token),
                       json={"model": "tiny-clip", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
    assert "fidelity evaluator" in chat.json()["error"]["message"]
    images = client.post("/v1/images/generations", headers=bearer(admin_token),
                         json={"model": "tiny-dino", "prompt": PROMPT})
    assert images.status_code == 400 and "fidelity evaluator" in images.json()["error"]["message"]

    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune-images",
                                                                  "instance_prompt": PROMPT},
                         files={"file": ("disc.zip", disc_zip())})
    assert upload.status_code == 201, upload.text
    job = client.post("/v1/fine_tuning/jobs", headers=bearer(trainer),
                      json={"model": "tiny-clip", "training_file": upload.json()["id"]})
    assert job.status_code == 400 and job.json()["error"]["param"] == "model"
    assert "cannot be used for chat, image generation or fine-tuning" in job.json()["error"]["message"]


def test_an_image_job_reports_clip_and_dino_before_and_after(client, state, store, make_token):
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune-images",
                                                                  "instance_prompt": PROMPT},
                         files={"file": ("disc.zip", disc_zip())})
    assert upload.status_code == 201, upload.text
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    hp = {"max_train_steps": 2, "train_batch_size": 1, "validation_every_steps": 0, "checkpoint_every_steps": 0}
    with pytest.raises(openai.BadRequestError) as bad:
        api.fine_tuning.jobs.create(model=store["image"], training_file=upload.json()["id"], method={
            "type": "dreambooth_lora", "dreambooth_lora": {"hyperparameters": {**hp, "evaluation_prompts": []}}})
    assert bad.value.body["param"] == "method.dreambooth_lora.hyperparameters.evaluation_prompts"
    prompts = ["a photo of sks disc on the moon"]
    job = api.fine_tuning.jobs.create(model=store["image"], training_file=upload.json()["id"], seed=3, method={
        "type": "dreambooth_lora", "dreambooth_lora": {"hyperparameters": {**hp, "evaluation_prompts": prompts}}})
    deadline = Deadline(240)
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert deadline
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    # the memory plan counts the larger evaluator, on the device while it scores the samples
    evaluator = max(state.catalog.get_base_model(n, evaluators=True).parameters for n in ("tiny-clip", "tiny-dino"))
    assert job.model_extra["compute"]["plan"]["breakdown_bytes"]["evaluation"] >= evaluator * 2
    metrics = job.model_extra["metrics"]
    for key in ("clip_i", "dino", "clip_t"):
        assert isinstance(metrics[f"{key}_before"], float) and isinstance(metrics[f"{key}_after"], float)
    assert metrics["fidelity_evaluators"] == {"clip": "tiny-clip", "dino": "tiny-dino"}
    assert metrics["subject_fidelity_metric"].startswith("proxy:")  # the proxy is still there, labelled
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("after training: CLIP-I ") and "(tiny-clip, tiny-dino)" in m for m in messages)
    assert any("tiny-clip (clip)" in m for m in messages)

