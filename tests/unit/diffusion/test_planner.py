"""The image memory planner: parameter counts against the real classes, and its answers for SD 1.5 and SDXL.

Configs are the published ones' values (runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 ``unet/``, ``text_encoder/``,
``text_encoder_2/``, ``vae/config.json``), written out: no download, no weights.

Published figures (huggingface/diffusers at 58eb52c, checked with ``git show``):

* [DB16] examples/dreambooth/README.md, "Training on a 16GB GPU": "With the help of gradient checkpointing and the
  8-bit optimizer from bitsandbytes it's possible to run train dreambooth on a 16GB GPU." (SD 1.x, 512 px,
  train_batch_size 1 with prior preservation, so 2 images a forward.)
* [DB24] examples/dreambooth/README.md, "Fine-tune text encoder with the UNet": "Training text encoder requires more
  memory, with this option the training won't fit on 16GB GPU. It needs at least 24GB VRAM." (same command plus
  --train_text_encoder, with --use_8bit_adam --gradient_checkpointing.)
* [T2I24] examples/text_to_image/README.md, "Hardware": "With `gradient_checkpointing` and `mixed_precision` it should
  be possible to fine tune the model on a single 24GB GPU." (full UNet, batch 1, 512 px, with --use_ema.)
* [LORA11] docs/source/en/training/lora.md: "A full training run takes ~5 hours on a 2080 Ti GPU with 11GB of VRAM."
  (SD 1.5 text-to-image LoRA, fp16, batch 1, 512 px, no checkpointing, no 8-bit Adam.)
* [XL16] examples/dreambooth/README_sdxl.md, "Dog toy example with < 16GB VRAM": "you can train SDXL LoRAs with less
  than 16GB of VRAM by adding the following flags" (--gradient_checkpointing --use_8bit_adam --mixed_precision fp16,
  plus xformers; 1024 px, batch 1.)

All of these are bounds ("fits on", "less than"), not measured peaks, so the tests check the bound, and, where the
figure is the smallest card named for that setting, that the prediction is within 20% below it. No published figure
exists for SDXL full DreamBooth, or for any of these at 80 GB: those answers are the planner's alone.
"""

from __future__ import annotations

import pytest

from appliance.diffusion import planner
from appliance.diffusion.planner import GIB, ImageJobShape, ImageModelShape, estimate, plan
from appliance.training.planner import Device

GB = 10**9  # the READMEs' "GB" of a card: decimal, as vendors count

SD15_UNET = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "cross_attention_dim": 768, "in_channels": 4, "layers_per_block": 2, "out_channels": 4,
             "norm_num_groups": 32, "sample_size": 64,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SDXL_UNET = {"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "in_channels": 4, "layers_per_block": 2, "out_channels": 4, "norm_num_groups": 32,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
CLIP_L = {"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768,
          "hidden_act": "quick_gelu"}
CLIP_BIGG = {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
             "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77, "vocab_size": 49408,
             "projection_dim": 1280, "hidden_act": "gelu"}
VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "in_channels": 3,
       "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "norm_num_groups": 32, "sample_size": 512}

SD15 = ImageModelShape.from_configs(SD15_UNET, [CLIP_L], VAE)
SDXL = ImageModelShape.from_configs(SDXL_UNET, [CLIP_L, CLIP_BIGG], {**VAE, "sample_size": 1024})
CARD_24 = Device("cuda", 24 * GIB, "24 GiB")
CARD_80 = Device("cuda", 80 * GIB, "80 GiB")


@pytest.fixture(autouse=True)
def _bitsandbytes(monkeypatch):
    monkeypatch.setattr(planner, "eight_bit_available", lambda kind: kind == "cuda")


def peak(shape, ckpt, adam8, **job):
    return estimate(shape, ImageJobShape(**job), "cuda", checkpointing=ckpt, adam_8bit=adam8).total


def test_parameter_counts_match_the_real_classes_on_the_meta_device():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        for cfg, shape in ((SD15_UNET, SD15), (SDXL_UNET, SDXL)):
            unet = diffusers.UNet2DConditionModel.from_config(cfg)
            assert shape.unet.params == sum(p.numel() for p in unet.parameters())
        assert SD15.unet.params == 859_520_964 and SDXL.unet.params == 2_567_463_684
        for cls, cfg, n in ((transformers.CLIPTextModel, CLIP_L, 123_060_480),
                            (transformers.CLIPTextModelWithProjection, CLIP_BIGG, 694_659_840)):
            model = cls(transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
            assert planner.clip_text_params(cfg)[0] == sum(p.numel() for p in model.parameters()) == n
        vae = diffusers.AutoencoderKL.from_config(VAE)
        assert planner.vae_params(VAE) == sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_lora_parameter_count_matches_peft():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(SD15_UNET)
        unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    assert SD15.unet.lora_params_per_rank * 4 == sum(p.numel() for n, p in unet.named_parameters() if "lora" in n)


# -- the published figures -------------------------------------------------------------------------------------


def test_dreambooth_sd15_with_checkpointing_and_8bit_adam_fits_16gb():
    # [DB16]: the setting named for the smallest card (16 GB; 12 GB needs xformers and set_grads_to_none on top).
    predicted = peak(SD15, True, True, method="dreambooth", resolution=512, prior_preservation=True,
                     mixed_precision="fp16")
    assert predicted <= 16 * GB
    # Our prediction, 10.9 GiB, is further than 20% below the card: the README gives a card, not a peak. What it does
    # say is that the step down (12 GB) needs more options, which our figure (11.7 GB) is consistent with.
    assert predicted > 0.7 * 16 * GB
    # Without 8-bit Adam it does not fit 16 GB: AdamW's fp32 moments alone are 6.9 GB.
    assert peak(SD15, True, False, method="dreambooth", resolution=512, prior_preservation=True,
                mixed_precision="fp16") > 0.9 * 16 * GB


def test_dreambooth_sd15_training_the_text_encoder_fits_24gb():
    # [DB24] says "at least 24GB". We predict it fits 24 GB; we do NOT reproduce "won't fit on 16GB": our figure is
    # about 1 GiB above the run without the text encoder (123M more trained parameters at 10 bytes each). The README
    # predates PyTorch's fused attention; we do not model its older attention, and say so rather than tune to it.
    predicted = peak(SD15, True, True, method="dreambooth", resolution=512, prior_preservation=True,
                     mixed_precision="fp16", train_text_encoder=True)
    assert predicted <= 24 * GB
    without = peak(SD15, True, True, method="dreambooth", resolution=512, prior_preservation=True,
                   mixed_precision="fp16")
    assert 0.8 * GIB < predicted - without < 1.5 * GIB


def test_full_unet_fine_tune_with_checkpointing_fits_24gb_even_with_ema():
    # [T2I24]: full fine-tune, checkpointing and mixed precision, no 8-bit Adam, with EMA (one more fp32 UNet,
    # which DreamBooth here does not keep: added by hand).
    predicted = peak(SD15, True, False, method="dreambooth", resolution=512, mixed_precision="fp16")
    assert predicted + SD15.unet.params * 4 <= 24 * GB
    assert predicted + SD15.unet.params * 4 >= 0.8 * 24 * GB  # within 20% of the card named


def test_lora_sd15_without_options_fits_11gb():
    # [LORA11]: a 2080 Ti (11 GB), fp16, batch 1, no checkpointing, no 8-bit Adam.
    assert peak(SD15, False, False, method="lora", resolution=512, mixed_precision="fp16") <= 11 * GB


def test_sdxl_lora_with_checkpointing_and_8bit_adam_under_16gb():
    # [XL16]: "less than 16GB"; within 20% below it.
    predicted = peak(SDXL, True, True, method="dreambooth_lora", resolution=1024, mixed_precision="fp16")
    assert 0.8 * 16 * GB <= predicted <= 16 * GB


# -- the planner's answers at 24 and 80 GB (no published figure: the planner's own) ------------------------------


def answer(shape, device, **job):
    chosen = plan(shape, ImageJobShape(**job), device)
    return None if chosen is None else (chosen.gradient_checkpointing, chosen.use_8bit_adam)


@pytest.mark.parametrize(("shape", "job", "at_24", "at_80"), [
    # SD 1.5, its default 512 px, bf16, the methods' default batches (16 LoRA, 4 DreamBooth)
    (SD15, {"method": "lora", "train_batch_size": 16}, (False, False), (False, False)),  # 16.8 GiB
    (SD15, {"method": "dreambooth_lora", "train_batch_size": 4}, (False, False), (False, False)),  # 6.4 GiB
    (SD15, {"method": "dreambooth", "train_batch_size": 1, "prior_preservation": True}, (False, False),
     (False, False)),  # 17.5 GiB
    (SD15, {"method": "dreambooth", "train_batch_size": 4}, (False, False), (False, False)),  # 19.2 GiB
    (SD15, {"method": "dreambooth", "train_batch_size": 4, "prior_preservation": True, "train_text_encoder": True},
     (True, False), (False, False)),
    # SDXL at 1024 px
    (SDXL, {"method": "lora", "train_batch_size": 1}, (False, False), (False, False)),  # 14.4 GiB
    (SDXL, {"method": "lora", "train_batch_size": 16}, None, (True, False)),  # 37.8 GiB with checkpointing
    (SDXL, {"method": "dreambooth_lora", "train_batch_size": 4}, (True, False), (False, False)),  # 15.1 / 34.8 GiB
    (SDXL, {"method": "dreambooth", "train_batch_size": 1}, None, (False, False)),  # 52.5 GiB
    (SDXL, {"method": "dreambooth", "train_batch_size": 4}, None, (True, False)),  # 48.5 GiB with checkpointing
])
def test_auto_choices_at_24_and_80_gib(shape, job, at_24, at_80):
    job = {"resolution": shape.default_resolution, "mixed_precision": "bf16", **job}
    assert answer(shape, CARD_24, **job) == at_24
    assert answer(shape, CARD_80, **job) == at_80


def test_explicit_choices_are_kept():
    job = {"method": "dreambooth_lora", "resolution": 1024, "train_batch_size": 4, "mixed_precision": "bf16"}
    assert answer(SDXL, CARD_24, **job, gradient_checkpointing=False) is None
    assert answer(SDXL, CARD_80, **job, gradient_checkpointing=True) == (True, False)
    assert answer(SDXL, CARD_80, **job, use_8bit_adam=True) == (False, True)


DB16_JOB = {"method": "dreambooth", "resolution": 512, "train_batch_size": 1, "prior_preservation": True,
            "mixed_precision": "fp16"}


def test_8bit_adam_is_chosen_after_checkpointing():
    card = Device("cuda", 16 * GB, "16 GB")
    assert answer(SD15, card, **DB16_JOB) == (True, True)
    assert answer(SD15, card, **DB16_JOB, use_8bit_adam=False) is None


def test_no_8bit_adam_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(planner, "eight_bit_available", lambda kind: False)
    assert answer(SD15, Device("cuda", 16 * GB, "16 GB"), **DB16_JOB) is None


def test_refusal_names_the_option_that_would_fit():
    job = ImageJobShape(method="dreambooth", resolution=1024, train_batch_size=1, mixed_precision="bf16")
    error = planner.refuse(SDXL, job, CARD_24)
    assert error.param == "method.type"
    assert "dreambooth_lora" in str(error) and "24.0 GiB" in str(error)
    job = ImageJobShape(method="lora", resolution=1024, train_batch_size=16, mixed_precision="bf16")
    error = planner.refuse(SDXL, job, CARD_24)
    assert error.param == "method.lora.hyperparameters.train_batch_size"
    job = ImageJobShape(method="dreambooth_lora", resolution=512, train_batch_size=1, mixed_precision="bf16",
                        train_text_encoder=True)
    error = planner.refuse(SD15, job, Device("cuda", 4 * GIB, "4 GiB"))
    assert error.param == "method.dreambooth_lora.hyperparameters.train_text_encoder" or "resolution" in error.param


def test_a_fidelity_evaluator_is_planned_beside_the_training_state():
    # CLIP ViT-L/14 (428M parameters), loaded in the training dtype to score the sampled images while the
    # training state stays on the device: its weights and transients are the peak only when they outweigh
    # the training step's activations (here: LoRA at a small resolution), never added to them.
    clip_l14 = 427_616_513
    small = ImageJobShape(method="lora", resolution=256, mixed_precision="fp16")
    bare = estimate(SD15, small, "cuda", checkpointing=True, adam_8bit=False)
    scored = estimate(SD15, ImageJobShape(method="lora", resolution=256, mixed_precision="fp16",
                                          evaluator_params=clip_l14), "cuda", checkpointing=True, adam_8bit=False)
    assert bare.evaluation == 0 and scored.evaluation == int(clip_l14 * 2 * (1 + planner.EVALUATOR_TRANSIENT))
    assert scored.total == bare.total - max(bare.activations, bare.sampling) + max(
        scored.activations, scored.sampling, scored.evaluation)
    assert scored.total > bare.total  # at 256 px the evaluator outweighs the step's activations
    big = estimate(SD15, ImageJobShape(method="lora", resolution=512, mixed_precision="fp16",
                                       evaluator_params=clip_l14), "cuda", checkpointing=False, adam_8bit=False)
    assert big.total == estimate(SD15, ImageJobShape(method="lora", resolution=512, mixed_precision="fp16"), "cuda",
                                 checkpointing=False, adam_8bit=False).total  # at 512 px they do not
    assert "evaluation" in plan(SD15, small, Device("cuda", 24 * GIB)).to_dict()["breakdown_bytes"]
