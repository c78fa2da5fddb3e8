"""SDXL training on a tiny random SDXL pipeline: every method trains on images of mixed shapes (aspect-ratio
buckets, ``add_time_ids``), resumes exactly, and its artefact loads in stock ``StableDiffusionXLPipeline``."""

import pytest
import torch
from safetensors.torch import load as load_safetensors

from appliance.diffusion import train_images
from appliance.diffusion.compat import text_encoder_lora_supported
from appliance.diffusion.trainer import _buckets, _prepare
from appliance.errors import InvalidRequestError

from .conftest import PROMPT, QUICK, make_spec, mixed_sizes_dataset, red_disc, same, tensors
from .test_recipes import write

BUCKETS = {"12x20": 1, "16x16": 2, "20x12": 1}


def generate(pipe, seed=0):
    return pipe(PROMPT, num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def stock_pipeline(path, **components):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, add_watermarker=False,
                                                     **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_buckets_keep_sdxl_shapes_and_time_ids_record_the_crop():
    buckets = _buckets(1024, 32)
    assert {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768)} <= set(buckets)  # SDXL's own sizes
    assert all(w * h <= 1024 * 1024 and w % 32 == h % 32 == 0 and max(w, h) / min(w, h) <= 2 for w, h in buckets)
    wide, square = red_disc(0, 32).resize((32, 16)), red_disc(1)
    pixels = _prepare([wide, square], 16, _buckets(16, 2))
    assert [tuple(t.shape) for t in pixels.images] == [(3, 12, 20), (3, 16, 16)]
    # original (h, w), crop top-left in the resized image (24x12 -> 20x12: 2 px off the left), target (h, w)
    assert pixels.time_ids.tolist() == [[16, 32, 0, 2, 12, 20], [16, 16, 0, 0, 16, 16]]
    assert all(t.min() >= -1 and t.max() <= 1 for t in pixels.images)
    center = _prepare([wide], 16, None)  # SD 1.x/2.x: the square centre crop, as before
    assert tuple(center.images[0].shape) == (3, 16, 16)


@pytest.mark.parametrize("method,extra", [("lora", {}),
                                          ("dreambooth_lora", {"class_prompt": "a photo of disc",
                                                               "num_class_images": 2})])
def test_sdxl_lora_trains_on_mixed_shapes_and_loads_in_stock_diffusers(tiny_sdxl, tmp_path, method, extra,
                                                                        monkeypatch):
    from diffusers import UNet2DConditionModel

    seen = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.training:
            cond = kwargs["added_cond_kwargs"]
            seen.append((tuple(sample.shape), tuple(encoder_hidden_states.shape), tuple(cond["text_embeds"].shape),
                         cond["time_ids"].tolist()))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    events = []
    result = train_images(make_spec(method, **QUICK, rank=4, **extra), tiny_sdxl, mixed_sizes_dataset(),
                          sample_steps=2, on_event=events.append)
    monkeypatch.undo()
    assert result.status == "succeeded" and result.details["aspect_ratio_buckets"] == BUCKETS
    assert "4 images in 3 aspect-ratio bucket(s) of about 16x16 pixels: 12x20 (1), 16x16 (2), 20x12 (1)" in [
        e.message for e in events]
    assert result.details["pipeline_class"] == "StableDiffusionXLPipeline" and not result.details["center_crop"]
    keys = load_safetensors(result.artifacts["pytorch_lora_weights.safetensors"])
    assert keys and all(k.startswith("unet.") for k in keys)
    # Both encoders' states (32 + 32 wide) and the pooled 32-wide projection reach the UNet, one pass per shape.
    assert seen and all(states[2] == 64 and pooled[1] == 32 for _, states, pooled, _ in seen)
    shapes = {s[0][2:] for s in seen}
    assert {(16, 16), (12, 20)} <= shapes or {(16, 16), (20, 12)} <= shapes
    assert [16.0, 32.0, 0.0, 2.0, 12.0, 20.0] in [ids for *_, batch in seen for ids in batch]

    pipe = stock_pipeline(tiny_sdxl)
    before = generate(pipe)
    pipe.load_lora_weights(write(result.artifacts, tmp_path / "lora"))  # StableDiffusionXLPipeline's own loader
    after = generate(pipe)
    assert not (before == after).all()
    pipe.unload_lora_weights()
    assert (generate(pipe) == before).all()


def test_sdxl_dreambooth_trains_both_text_encoders_and_loads_in_stock_diffusers(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    result = train_images(make_spec("dreambooth", **QUICK, train_text_encoder=True), tiny_sdxl,
                          mixed_sizes_dataset(), sample_steps=1)
    assert result.details["trained_components"] == ["unet", "text_encoder", "text_encoder_2"]
    assert set(result.artifacts) == {f"{c}/{f}" for c, f in [
        ("unet", "config.json"), ("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "config.json"),
        ("text_encoder", "model.safetensors"), ("text_encoder_2", "config.json"),
        ("text_encoder_2", "model.safetensors")]}
    out = write(result.artifacts, tmp_path / "db")
    trained = {"unet": UNet2DConditionModel.from_pretrained(out / "unet"),
               "text_encoder": CLIPTextModel.from_pretrained(out / "text_encoder"),
               "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")}
    base = stock_pipeline(tiny_sdxl)
    for name, model in trained.items():
        ours, theirs = model.state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours), name
    assert not (generate(stock_pipeline(tiny_sdxl, **trained)) == generate(base)).all()


@pytest.mark.parametrize("method,extra", [
    ("dreambooth_lora", {"class_prompt": "a photo of disc", "num_class_images": 3, "snr_gamma": 5.0}),
    ("dreambooth", {"train_text_encoder": True}),
])
def test_sdxl_resumed_run_ends_on_the_same_weights(tiny_sdxl, method, extra):
    hp = {**QUICK, "max_train_steps": 4, "checkpoint_every_steps": 2, **extra}
    checkpoints = {}
    data = mixed_sizes_dataset()
    whole = train_images(make_spec(method, **hp), tiny_sdxl, data, on_checkpoint=checkpoints.__setitem__,
                         sample_steps=1)
    assert sorted(checkpoints) == [2]
    resumed = train_images(make_spec(method, **hp), tiny_sdxl, data, resume_from=checkpoints[2], sample_steps=1)
    assert resumed.metrics.steps == 4 and same(tensors(resumed), tensors(whole))


def test_sdxl_text_encoder_lora_covers_both_encoders_or_is_refused(tiny_sdxl, tmp_path):
    supported, why = text_encoder_lora_supported()
    spec = make_spec("lora", **QUICK, train_text_encoder=True)
    if not supported:  # this appliance's transformers/peft pair: refused before any work, naming the field
        with pytest.raises(InvalidRequestError, match="needs peft >= ") as info:
            train_images(spec, tiny_sdxl, mixed_sizes_dataset(), sample_steps=1)
        assert info.value.param == "method.lora.hyperparameters.train_text_encoder"
        return
    result = train_images(spec, tiny_sdxl, mixed_sizes_dataset(), sample_steps=1)
    keys = load_safetensors(result.artifacts["pytorch_lora_weights.safetensors"])
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = stock_pipeline(tiny_sdxl)
    pipe.load_lora_weights(write(result.artifacts, tmp_path / "lora"))
    assert pipe.get_list_adapters().keys() >= {"unet", "text_encoder", "text_encoder_2"}
