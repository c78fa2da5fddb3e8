"""Each recipe runs a few real steps on the tiny pipeline; artefacts load in stock diffusers."""

import io

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from appliance.diffusion import ImageDatasetError, train_images
from appliance.diffusion.compat import text_encoder_lora_supported
from appliance.errors import InvalidRequestError

from .conftest import PROMPT, QUICK, disc_dataset, make_spec, tensors


def write(files: dict[str, bytes], dest):
    for name, data in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return dest


def generate(pipe, seed=0):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("method", ["lora", "dreambooth_lora"])
def test_lora_artifact_loads_in_stock_diffusers(tiny_sd, discs, tmp_path, method):
    from diffusers import StableDiffusionPipeline

    events = []
    result = train_images(make_spec(method, **QUICK, rank=4), tiny_sd, discs, on_event=events.append,
                          sample_steps=2, event_every_steps=1)
    assert result.status == "succeeded" and set(result.artifacts) == {"pytorch_lora_weights.safetensors"}
    tensors = load_safetensors(result.artifacts["pytorch_lora_weights.safetensors"])
    assert tensors and all(k.startswith("unet.") and ".lora." in k for k in tensors)
    assert [e.step for e in events if e.type == "train"] == [1, 2, 3]
    train = [e for e in events if e.type == "train"][-1]
    assert train.train_loss > 0 and train.learning_rate == 1e-2 and train.images_per_second > 0
    assert result.metrics.steps == 3 and result.details["lora_rank"] == 4

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(write(result.artifacts, tmp_path / "lora"))  # the stock loader, from a directory
    after = generate(pipe)
    assert not (before == after).all()
    pipe.unload_lora_weights()
    assert (generate(pipe) == before).all()


def test_lora_pairs_captions_and_falls_back_to_the_instance_prompt(tiny_sd):
    data = disc_dataset(2, captions=["a red disc", ""], instance_prompt=None)
    with pytest.raises(ImageDatasetError, match="1 image\\(s\\) have no caption and there is no instance prompt") as e:
        train_images(make_spec("lora", **QUICK), tiny_sd, data, sample_steps=1)
    assert e.value.param == "method.lora.hyperparameters.instance_prompt"
    result = train_images(make_spec("lora", **QUICK, instance_prompt="sks disc"), tiny_sd, data, sample_steps=1)
    assert result.details["instance_prompt"] == "sks disc" and result.details["sample_prompt"] == "sks disc"
    with pytest.raises(ImageDatasetError, match="DreamBooth needs an instance prompt"):
        train_images(make_spec("dreambooth", **QUICK), tiny_sd, data, sample_steps=1)


def test_dreambooth_writes_whole_models_in_diffusers_layout(tiny_sd, discs, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    result = train_images(make_spec("dreambooth", **QUICK, train_text_encoder=True), tiny_sd, discs, sample_steps=1)
    assert set(result.artifacts) == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                     "text_encoder/config.json", "text_encoder/model.safetensors"}
    out = write(result.artifacts, tmp_path / "db")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    changed = [n for n, p in unet.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > 10
    CLIPTextModel.from_pretrained(out / "text_encoder")
    assert result.details["trained_components"] == ["unet", "text_encoder"]


def test_text_encoder_lora_needs_a_compatible_peft(tiny_sd, discs):
    supported, why = text_encoder_lora_supported()
    spec = make_spec("dreambooth_lora", **QUICK, train_text_encoder=True)
    if supported:
        result = train_images(spec, tiny_sd, discs, sample_steps=1)
        keys = load_safetensors(result.artifacts["pytorch_lora_weights.safetensors"])
        assert any(k.startswith("text_encoder.") for k in keys)
    else:
        with pytest.raises(InvalidRequestError, match="needs peft >= ") as info:
            train_images(spec, tiny_sd, discs, sample_steps=1)
        assert info.value.param == "method.dreambooth_lora.hyperparameters.train_text_encoder"


def test_prior_preservation_snr_accumulation_and_validation_images(tiny_sd, discs):
    events = []
    hp = {**QUICK, "class_prompt": "a photo of a disc", "num_class_images": 3, "prior_loss_weight": 0.5,
          "snr_gamma": 5.0, "gradient_accumulation_steps": 2, "validation_every_steps": 2}
    result = train_images(make_spec("dreambooth_lora", **hp), tiny_sd, discs, on_event=events.append,
                          sample_steps=1)
    assert result.metrics.n_class_images == 3 and result.details["prior_preservation"]
    assert any("generated 3 class images for 'a photo of a disc'" in e.message for e in events)
    # 3 steps x 2 micro-batches x (2 instance + 2 class) images
    assert result.metrics.images_per_second * result.metrics.train_seconds == pytest.approx(24)
    validation = [e for e in events if e.type == "validation"]
    assert [e.step for e in validation] == [2] and set(validation[0].images) == {"validation_step_000002.png"}
    assert validation[0].to_dict()["images"] == {"validation_step_000002.png": len(validation[0].images[
        "validation_step_000002.png"])}
    assert set(result.images) == {"before_after.png", "validation_step_000002.png"}
    grid = Image.open(io.BytesIO(result.images["before_after.png"]))
    assert grid.size == (4 * 64, 3 * 64)  # instance images, before, after; 16 px tiles shown at 64 px


def test_bf16_mixed_precision_runs_on_cpu(tiny_sd, discs):
    result = train_images(make_spec("dreambooth_lora", **QUICK, mixed_precision="bf16"), tiny_sd, discs,
                          sample_steps=1)
    assert result.status == "succeeded" and result.hyperparameters.mixed_precision == "bf16"
    tensors = load_safetensors(result.artifacts["pytorch_lora_weights.safetensors"])
    assert all(t.dtype == torch.float32 for t in tensors.values())  # trainable weights stay float32


def test_bad_arguments_name_the_parameter(tiny_sd, discs):
    with pytest.raises(InvalidRequestError, match="`device` must be") as info:
        train_images(make_spec("lora", **QUICK), tiny_sd, discs, device="tpu")
    assert info.value.param == "device"
    with pytest.raises(InvalidRequestError, match="`dataset` must be the dataset archive's bytes"):
        train_images(make_spec("lora", **QUICK), tiny_sd, "images.zip")
    with pytest.raises(InvalidRequestError, match="resolution: must be a multiple"):
        train_images(make_spec("lora", **{**QUICK, "resolution": 12}), tiny_sd, discs)


def blue_square(i: int, size: int = 24) -> Image.Image:
    """A class image: not the subject (and of another size: cropped to the resolution like any)."""
    image = Image.new("RGB", (size, size + 4 * i), "white")
    image.paste((30, 30, 200), (4, 4, size - 4, size - 4))
    return image


def test_uploaded_class_images_come_first_and_generated_ones_top_them_up(tiny_sd, discs):
    """Prior preservation with the data owner's own class images (``class_images_file``): as many as were
    uploaded by default; ``num_class_images`` beyond them are generated, as diffusers' scripts top up
    ``--class_data_dir``; the uploaded images are really trained on (the run differs from a generated one)."""
    from appliance.diffusion.data import build_dataset_zip

    classes = build_dataset_zip([blue_square(i) for i in range(2)], None, None)
    hp = {**QUICK, "class_prompt": "a photo of a disc", "prior_loss_weight": 1.0}
    events = []
    own = train_images(make_spec("dreambooth_lora", **hp), tiny_sd, discs, class_dataset=classes,
                       on_event=events.append, sample_steps=1)
    assert own.hyperparameters.num_class_images == 2 and own.metrics.n_class_images == 2
    assert own.details["class_images"] == {"uploaded": 2, "generated": 0}
    assert any(e.message == "2 uploaded class images for 'a photo of a disc'" for e in events)

    events.clear()
    topped = train_images(make_spec("dreambooth_lora", **hp, num_class_images=3), tiny_sd, discs,
                          class_dataset=classes, on_event=events.append, sample_steps=1)
    assert topped.details["class_images"] == {"uploaded": 2, "generated": 1} and topped.metrics.n_class_images == 3
    assert any(e.message == "2 uploaded and 1 generated class images for 'a photo of a disc'" for e in events)

    generated = train_images(make_spec("dreambooth_lora", **hp, num_class_images=2), tiny_sd, discs,
                             sample_steps=1)
    assert generated.details["class_images"] == {"uploaded": 0, "generated": 2}
    ours = load_safetensors(own.artifacts["pytorch_lora_weights.safetensors"])
    theirs = load_safetensors(generated.artifacts["pytorch_lora_weights.safetensors"])
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_class_images_need_a_class_prompt_and_a_readable_archive(tiny_sd, discs):
    with pytest.raises(InvalidRequestError, match="`class_images_file` needs `class_prompt`") as info:
        train_images(make_spec("dreambooth_lora", **QUICK), tiny_sd, discs, class_dataset=discs)
    assert info.value.param == "class_images_file"
    with pytest.raises(ImageDatasetError) as info:
        train_images(make_spec("dreambooth_lora", **QUICK, class_prompt="a disc"), tiny_sd, discs,
                     class_dataset=b"not a zip")
    assert info.value.param == "class_images_file"


@pytest.mark.parametrize("method, extra", [("dreambooth_lora", {"rank": 4}),
                                           ("dreambooth", {"train_text_encoder": True})])
def test_gradient_checkpointing_trains_the_same_model(tiny_sd, discs, method, extra):
    """``gradient_checkpointing`` recomputes activations in the backward pass: the same losses and weights
    (the UNet's, and a trained text encoder's), only less memory held between the passes."""
    hp = {**QUICK, **extra, "class_prompt": "a photo of a disc", "num_class_images": 2}
    plain = train_images(make_spec(method, **hp), tiny_sd, discs, sample_steps=1)
    recomputed = train_images(make_spec(method, **hp, gradient_checkpointing=True), tiny_sd, discs, sample_steps=1)
    assert plain.details["gradient_checkpointing"] is False and recomputed.details["gradient_checkpointing"] is True
    for run in (plain, recomputed):  # the measured peak, beside which an image memory plan will stand
        assert run.details["memory"]["measured_peak_bytes"] > 0 and "resident set" in run.details["memory"]["measured_how"]
    assert recomputed.metrics.train_loss == pytest.approx(plain.metrics.train_loss, rel=1e-5)
    ours, theirs = tensors(recomputed), tensors(plain)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)


def test_8bit_adam_keeps_its_state_in_8_bits_and_resumes_exactly(tiny_sd, discs):
    """``use_8bit_adam`` trains with bitsandbytes' AdamW8bit: its moments are stored as 8-bit codes (in the
    checkpoint too), the run differs from 32-bit AdamW's, and a resumed run ends on the same weights."""
    from appliance.diffusion.checkpoint import load

    hp = {**QUICK, "max_train_steps": 4, "checkpoint_every_steps": 2, "learning_rate": 1e-3}
    checkpoints = {}
    eight = train_images(make_spec("dreambooth", **hp, use_8bit_adam=True), tiny_sd, discs,
                         on_checkpoint=checkpoints.__setitem__, sample_steps=1)
    assert eight.details["optimizer"] == "adamw_8bit" and eight.hyperparameters.use_8bit_adam is True
    state = load(checkpoints[2], param="checkpoint")["optimizer"]
    # bitsandbytes keeps tensors of 4096+ elements' moments as 8-bit codes (smaller ones in 32 bits)
    moments = [v for per_param in state["state"].values()
               for k, v in per_param.get("__bnb_optimizer_quant_state__", per_param).items() if k in ("state1", "state2")]
    assert sum(m.dtype == torch.uint8 for m in moments) >= 20
    full = train_images(make_spec("dreambooth", **hp), tiny_sd, discs, sample_steps=1)
    assert full.details["optimizer"] == "adamw"
    ours, adamw = tensors(eight), tensors(full)
    assert ours.keys() == adamw.keys() and any(not torch.equal(ours[k], adamw[k]) for k in ours)
    resumed = tensors(train_images(make_spec("dreambooth", **hp, use_8bit_adam=True), tiny_sd, discs,
                                    resume_from=checkpoints[2], sample_steps=1))
    assert resumed.keys() == ours.keys() and all(torch.equal(resumed[k], ours[k]) for k in ours)


def test_memory_options_are_true_false_or_auto():
    from appliance.diffusion.hyperparameters import HyperparameterError

    with pytest.raises(HyperparameterError) as info:
        make_spec("dreambooth", gradient_checkpointing="yes", use_8bit_adam=1)
    assert dict(info.value.problems) == {
        "method.dreambooth.hyperparameters.gradient_checkpointing": 'must be true, false or "auto"; got \'yes\'',
        "method.dreambooth.hyperparameters.use_8bit_adam": 'must be true, false or "auto"; got 1'}
