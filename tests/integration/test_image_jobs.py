"""Image fine-tuning end to end on the tiny pipeline: upload, DreamBooth+LoRA and DreamBooth jobs, images API."""

from __future__ import annotations

import base64
import io
import json
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


def disc(size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((size // 6, size // 6, size - size // 6, size - size // 6), fill=(220, 20, 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def zip_of(images: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in images.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def image_model(state, tmp_path) -> str:
    from appliance.diffusion import build_tiny_sd_pipeline

    state.catalog.import_model(CLI_CTX, build_tiny_sd_pipeline(tmp_path / "tiny-sd", seed=0), DEMO_IMAGE_MODEL_NAME)
    return DEMO_IMAGE_MODEL_NAME


def run_job(client, trainer: str, model: str, file_id: str, method: dict) -> openai.types.fine_tuning.FineTuningJob:
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    job = api.fine_tuning.jobs.create(model=model, training_file=file_id, seed=3, method=method)
    deadline = Deadline(240)
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert deadline
        time.sleep(0.5)
    return job


@pytest.mark.slow  # minutes of compute and no database behaviour of its own: the SQLite pass only
def test_dreambooth_lora_and_dreambooth_jobs_then_images_through_the_openai_client(
        client, state, image_model, make_token, tmp_path):
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    consumer = make_token("carl", Role.CONSUMER, "acme")
    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune-images",
                                                                  "instance_prompt": PROMPT},
                         files={"file": ("disc.zip", zip_of({f"disc{i}.png": disc() for i in range(4)}))})
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]
    hp = {"max_train_steps": 60, "learning_rate": 3e-3, "train_batch_size": 2, "rank": 8,
          "validation_every_steps": 0, "checkpoint_every_steps": 30}
    db_lora = run_job(client, trainer, image_model, file_id, {"type": "dreambooth_lora",
                                                              "dreambooth_lora": {"hyperparameters": hp}})
    assert db_lora.status == "succeeded", db_lora.error
    metrics = db_lora.model_extra["metrics"]
    assert metrics["subject_fidelity_proxy_color_histogram_after"] > \
        metrics["subject_fidelity_proxy_color_histogram_before"]
    # The before/after grid is a result file, encrypted like any upload and readable by the data owner.
    assert db_lora.result_files
    grid = client.get(f"/v1/files/{db_lora.result_files[-1]}/content", headers=bearer(owner))
    assert grid.status_code == 200 and Image.open(io.BytesIO(grid.content)).format == "PNG"

    full = run_job(client, trainer, image_model, file_id, {"type": "dreambooth", "dreambooth": {"hyperparameters": {
        "max_train_steps": 40, "learning_rate": 1e-3, "train_batch_size": 2, "validation_every_steps": 0}}})
    assert full.status == "succeeded", full.error

    images = openai.OpenAI(api_key=consumer, base_url=str(client.base_url) + "/v1", http_client=client,
                           max_retries=0)
    for model in (db_lora.fine_tuned_model, full.fine_tuned_model, image_model):
        result = images.images.generate(model=model, prompt=PROMPT, n=2, size="16x16", response_format="b64_json",
                                        extra_body={"seed": 1, "num_inference_steps": 4})
        assert len(result.data) == 2
        for item in result.data:
            img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
            assert img.format == "PNG" and img.size == (16, 16)
    with pytest.raises(openai.BadRequestError) as info:
        images.images.generate(model=image_model, prompt=PROMPT, response_format="url")
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        images.chat.completions.create(model=image_model, messages=[{"role": "user", "content": "hi"}])

    # The LoRA artefact is in diffusers format and loads in stock diffusers.
    from diffusers import StableDiffusionPipeline

    out = state.catalog.export(None, CLI_CTX, db_lora.fine_tuned_model, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(state.catalog.get_base_model(image_model).path)
    pipe.load_lora_weights(out)
    exported = state.catalog.export(None, CLI_CTX, full.fine_tuned_model, tmp_path / "db")
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((exported / "manifest.json").read_text())["method"] == "dreambooth"


def test_image_jobs_need_image_datasets(client, image_model, make_token):
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    text_file = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                            files={"file": ("t.jsonl", b'{"text": "hello"}\n')}).json()["id"]
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=image_model, training_file=text_file, method={"type": "dreambooth"})
    assert info.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=image_model, training_file=text_file, method={
            "type": "dreambooth", "dreambooth": {"hyperparameters": {"resolution": -5, "snr_gamma": "x"}}})
    assert "resolution" in info.value.message and "snr_gamma" in info.value.message
    # text-encoder LoRA where this appliance's transformers/peft pair cannot attach it: refused now, at the field,
    # not at the start of the run (full DreamBooth trains the encoder whole and is unaffected)
    from appliance.diffusion.compat import text_encoder_lora_supported

    if not text_encoder_lora_supported()[0]:
        with pytest.raises(openai.BadRequestError) as info:
            api.fine_tuning.jobs.create(model=image_model, training_file=text_file, method={
                "type": "dreambooth_lora", "dreambooth_lora": {"hyperparameters": {"train_text_encoder": True}}})
        assert info.value.body["param"] == "method.dreambooth_lora.hyperparameters.train_text_encoder"
        assert "needs peft >= " in info.value.message and "set it to false" in info.value.message


def square(size: int = 48) -> bytes:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle((size // 5, size // 5, size - size // 5, size - size // 5), fill=(30, 30, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_dreambooth_with_the_data_owners_own_class_images(client, state, image_model, make_token):
    """Prior preservation with uploaded class images (``class_images_file``): an image dataset scanned and
    encrypted like the instance images, checked at creation, fed to the worker, named in the job, its
    events, the audit log and the adapter's lineage."""
    from sqlalchemy import select

    from appliance.audit.models import AuditEvent

    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    stranger = make_token("sam", Role.DATA_OWNER, "globex")

    def upload(token: str, images: dict[str, bytes], **data) -> str:
        resp = client.post("/v1/files", headers=bearer(token), data={"purpose": "fine-tune-images", **data},
                           files={"file": ("images.zip", zip_of(images))})
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    instance = upload(owner, {f"disc{i}.png": disc() for i in range(2)}, instance_prompt=PROMPT)
    classes = upload(owner, {f"square{i}.png": square() for i in range(3)})
    elsewhere = upload(stranger, {"square.png": square()})
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    hp = {"max_train_steps": 2, "train_batch_size": 1, "validation_every_steps": 0, "checkpoint_every_steps": 0}
    method = {"type": "dreambooth_lora", "dreambooth_lora": {"hyperparameters": {**hp, "class_prompt": "a disc"}}}

    def refused(expect, **kw) -> dict:
        with pytest.raises(expect) as info:
            api.fine_tuning.jobs.create(model=image_model, training_file=instance, **kw)
        return info.value.body

    no_prompt = refused(openai.BadRequestError, method={"type": "dreambooth_lora", "dreambooth_lora": {
        "hyperparameters": hp}}, extra_body={"class_images_file": classes})
    assert no_prompt["param"] == "class_images_file" and "class_prompt" in no_prompt["message"]
    lora = refused(openai.BadRequestError, method={"type": "lora", "lora": {"hyperparameters": hp}},
                   extra_body={"class_images_file": classes})
    assert lora["param"] == "class_images_file" and "'lora'" in lora["message"]
    same = refused(openai.BadRequestError, method=method, extra_body={"class_images_file": instance})
    assert same["param"] == "class_images_file" and "another dataset" in same["message"]
    assert refused(openai.NotFoundError, method=method, extra_body={"class_images_file": elsewhere})

    job = api.fine_tuning.jobs.create(model=image_model, training_file=instance, seed=3, method=method,
                                      extra_body={"class_images_file": classes})
    assert job.model_extra["class_images_file"] == classes
    deadline = Deadline(240)
    while (job := api.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert deadline
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    assert job.model_extra["class_images_file"] == classes
    assert "measured_how" in job.model_extra["compute"]["measured"]  # the worker's measured peak memory
    assert job.method.model_extra["dreambooth_lora"]["hyperparameters"]["num_class_images"] == 3  # auto: all uploaded
    messages = [e.message for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert "3 uploaded class images for 'a disc'" in messages
    with state.db.read() as s:
        created = s.scalar(select(AuditEvent).where(AuditEvent.action == "job.create",
                                                    AuditEvent.resource_id == job.id))
    assert created.details["class_images_file"] == classes
    manifest = state.catalog.get_adapter(None, job.fine_tuned_model).row.manifest
    assert {d["id"] for d in manifest["datasets"]} == {instance, classes}  # the signed lineage names both


def test_an_image_job_stores_its_memory_plan_and_one_that_cannot_fit_is_refused(
        client, state, image_model, make_token, monkeypatch):
    from appliance.jobs.planning import worker_image_hyperparameters
    from appliance.training.planner import GIB, Device

    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune-images",
                                                                  "instance_prompt": PROMPT},
                         files={"file": ("disc.zip", zip_of({f"disc{i}.png": disc() for i in range(2)}))})
    assert upload.status_code == 201, upload.text
    api = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    method = {"type": "dreambooth", "dreambooth": {"hyperparameters": {"use_8bit_adam": False}}}
    monkeypatch.setattr(state.jobs, "training_device", lambda: Device("cuda", 256 << 10, "a 256 KiB card"))
    with pytest.raises(openai.BadRequestError) as info:
        api.fine_tuning.jobs.create(model=image_model, training_file=upload.json()["id"], method=method)
    assert info.value.body["param"].startswith("method.dreambooth.hyperparameters.")
    assert "a 256 KiB card (cuda)" in info.value.message and "this image job needs about" in info.value.message
    assert not api.fine_tuning.jobs.list().data  # nothing was created

    monkeypatch.setattr(state.jobs, "training_device", lambda: Device("cuda", 24 * GIB, "a 24 GiB card"))
    job = api.fine_tuning.jobs.create(model=image_model, training_file=upload.json()["id"], method=method)
    plan = job.model_extra["compute"]["plan"]
    assert plan["made"] == "at creation" and plan["device"]["name"] == "a 24 GiB card"
    assert plan["gradient_checkpointing"] is False and plan["use_8bit_adam"] is False  # a tiny model fits as it is
    assert plan["breakdown_bytes"]["runtime"] == GIB and plan["predicted_peak_bytes"] > GIB
    # The worker trains with the plan's choice where the job said "auto", and with the job's own value elsewhere.
    stored = job.model_dump()["method"]["dreambooth"]["hyperparameters"]
    chosen = worker_image_hyperparameters({"gradient_checkpointing": "auto", "use_8bit_adam": False},
                                          {"plan": {**plan, "gradient_checkpointing": True, "use_8bit_adam": True}})
    assert chosen == {"gradient_checkpointing": True, "use_8bit_adam": False}
    assert stored.get("gradient_checkpointing", "auto") == "auto"  # the job keeps what was asked
    api.fine_tuning.jobs.cancel(job.id)
