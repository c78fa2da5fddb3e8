"""SDXL end to end on the tiny random SDXL pipeline: photos of mixed shapes uploaded, DreamBooth+LoRA and
DreamBooth (both text encoders trained) jobs through the OpenAI client, images served by both fine-tunes."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch
from PIL import Image, ImageDraw

from appliance.identity.roles import Role
from tests.conftest import CLI_CTX, bearer

from .test_image_jobs import PROMPT, run_job, zip_of

SDXL = "tiny-sdxl"


def photo(width: int, height: int) -> bytes:
    img = Image.new("RGB", (width, height), "white")
    r = min(width, height) // 3
    ImageDraw.Draw(img).ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=(220, 20, 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.mark.slow  # compute, no database behaviour of its own: the SQLite pass only
def test_sdxl_dreambooth_lora_and_dreambooth_jobs_then_images(client, state, make_token, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from appliance.diffusion import build_tiny_sdxl_pipeline

    base_dir = build_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl", seed=0)
    state.catalog.import_model(CLI_CTX, base_dir, SDXL)
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    trainer = make_token("trish", Role.TRAINER, "acme")
    consumer = make_token("carl", Role.CONSUMER, "acme")
    shots = {"square.png": photo(48, 48), "wide.png": photo(96, 48), "tall.png": photo(48, 72),
             "square2.png": photo(64, 64)}
    upload = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune-images",
                                                                  "instance_prompt": PROMPT},
                         files={"file": ("shots.zip", zip_of(shots))})
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]
    hp = {"max_train_steps": 6, "learning_rate": 3e-3, "train_batch_size": 2, "validation_every_steps": 0,
          "checkpoint_every_steps": 3}
    db_lora = run_job(client, trainer, SDXL, file_id, {"type": "dreambooth_lora", "dreambooth_lora": {
        "hyperparameters": {**hp, "rank": 4}}})
    assert db_lora.status == "succeeded", db_lora.error
    jobs = openai.OpenAI(api_key=trainer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    messages = [e.message for e in jobs.fine_tuning.jobs.list_events(db_lora.id, limit=100).data]
    assert any(m.startswith("4 images in ") and "aspect-ratio bucket(s)" in m for m in messages), messages
    full = run_job(client, trainer, SDXL, file_id, {"type": "dreambooth", "dreambooth": {"hyperparameters": {
        **hp, "learning_rate": 1e-3, "train_text_encoder": True}}})
    assert full.status == "succeeded", full.error
    resolved = full.method.model_extra["dreambooth"]["hyperparameters"]
    assert resolved["resolution"] == 16 and resolved["train_text_encoder"] is True  # auto: the UNet's native size

    api = openai.OpenAI(api_key=consumer, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)

    def generate(model: str) -> np.ndarray:
        result = api.images.generate(model=model, prompt=PROMPT, n=1, size="16x16", response_format="b64_json",
                                     extra_body={"seed": 5, "num_inference_steps": 3})
        return pixels(result.data[0].b64_json)

    base, lora, dreambooth = generate(SDXL), generate(db_lora.fine_tuned_model), generate(full.fine_tuned_model)
    assert np.abs(lora - base).max() > 0 and np.abs(dreambooth - base).max() > 0

    # The served DreamBooth model is the exported one, text_encoder_2 included: stock diffusers, built from the
    # exported files, draws the same image; with the base's second text encoder it draws another.
    out = state.catalog.export(None, CLI_CTX, full.fine_tuned_model, tmp_path / "db")
    trained = {"unet": UNet2DConditionModel.from_pretrained(out / "unet"),
               "text_encoder": CLIPTextModel.from_pretrained(out / "text_encoder"),
               "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")}

    def stock(**components) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, local_files_only=True, add_watermarker=False,
                                                         **components)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(PROMPT, height=16, width=16, num_inference_steps=3,
                     generator=[torch.Generator("cpu").manual_seed(5)]).images[0]
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    assert np.abs(stock(**trained) - dreambooth).max() <= 1
    without_second = {k: v for k, v in trained.items() if k != "text_encoder_2"}
    assert np.abs(stock(**without_second) - dreambooth).max() > 1

    lora_out = state.catalog.export(None, CLI_CTX, db_lora.fine_tuned_model, tmp_path / "lora")
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, local_files_only=True, add_watermarker=False)
    pipe.load_lora_weights(lora_out)  # the stock SDXL loader takes the published adapter
    assert "unet" in pipe.get_list_adapters()
