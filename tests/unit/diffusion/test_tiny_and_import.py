import json
import shutil

import pytest
import torch

from appliance.diffusion import import_diffusers_model
from appliance.diffusion.tiny import TEST_PIPELINE_MARKER, build_tiny_sd_pipeline
from appliance.errors import ConflictError, InvalidRequestError
from appliance.modelstore import hash_model_dir


def test_tiny_pipeline_is_labelled_deterministic_and_loads(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index[TEST_PIPELINE_MARKER]["seed"] == 0 and "tests only" in index[TEST_PIPELINE_MARKER]["weights"]
    assert "RANDOM TEST PIPELINE" in (tiny_sd / "README.txt").read_text()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_sd / "tokenizer").iterdir()}
    again = build_tiny_sd_pipeline(tmp_path / "again", seed=0)
    other = build_tiny_sd_pipeline(tmp_path / "other", seed=1)
    assert hash_model_dir(again) == hash_model_dir(tiny_sd) != hash_model_dir(other)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    ids = pipe.tokenizer("a photo of sks disc").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 7  # one token per known word
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reconstructed = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    assert (reconstructed - x).abs().max() < 0.01  # the near-identity VAE
    image = pipe("a red disc", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (16, 16)


def test_import_copies_safetensors_and_configs_and_hashes(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    (tiny_sd.parent / "extra").mkdir(exist_ok=True)
    src = tmp_path / "src"
    shutil.copytree(tiny_sd, src)
    (src / "unet" / "notes.md").write_text("not copied")
    info = import_diffusers_model(src, tmp_path / "store" / "tiny", "tiny-sd")
    dest = tmp_path / "store" / "tiny"
    assert info.pipeline_class == "StableDiffusionPipeline" and info.family == "sd-other"
    assert info.default_resolution == 16 and info.prediction_type == "v_prediction" and info.test_pipeline
    assert info.components["unet"] == "diffusers.UNet2DConditionModel"
    assert info.content_hash == hash_model_dir(dest) and info.content_hash.startswith("sha256:")
    assert info.parameter_count > 100_000 and info.dtype == "float32"
    assert not (dest / "unet" / "notes.md").exists() and not (dest / "README.txt").exists()
    StableDiffusionPipeline.from_pretrained(dest, local_files_only=True)
    with pytest.raises(ConflictError, match="already exists"):
        import_diffusers_model(src, dest, "again")


def _broken(src, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    change(bad)
    return bad


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").rename(d / "unet" / "diffusion_pytorch_model.bin"),
     r"unet has no diffusion_pytorch_model.safetensors weights \(diffusion_pytorch_model.bin are pickle files"),
    (lambda d: (d / "pipeline.py").write_text("print('hi')"), "contains Python code"),
    (lambda d: (d / "model_index.json").write_text(json.dumps(
        {**json.loads((d / "model_index.json").read_text()), "unet": ["my_module", "MyUNet"]})),
     "component 'unet' is my_module.MyUNet, which is not an allowed class"),
    (lambda d: (d / "model_index.json").write_text(json.dumps(
        {**json.loads((d / "model_index.json").read_text()), "_class_name": "FluxPipeline"})),
     "`_class_name` is 'FluxPipeline'; supported"),
    (lambda d: (d / "vae" / "config.json").write_text(json.dumps(
        {**json.loads((d / "vae" / "config.json").read_text()), "block_out_channels": [8, 16]})),
     "the vae weights lack"),
    (lambda d: (d / "model_index.json").unlink(), "has no model_index.json"),
], ids=["pickle", "code", "custom-class", "pipeline", "mismatch", "no-index"])
def test_import_refuses_with_a_message_naming_the_path(tiny_sd, tmp_path, change, message):
    bad = _broken(tiny_sd, tmp_path, change)
    with pytest.raises(InvalidRequestError, match=message) as info:
        import_diffusers_model(bad, tmp_path / "store" / "x", "x")
    assert str(bad) in info.value.message and info.value.param == "src"
    assert not (tmp_path / "store" / "x").exists() and not list((tmp_path / "store").glob(".x*"))


def test_import_detects_sdxl(tmp_path):
    """A tiny SDXL pipeline (diffusers' SDXL test shapes) is recognised (training it: test_sdxl.py)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from appliance.diffusion.tiny import write_clip_vocabulary

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    vocab, _ = write_clip_vocabulary(tmp_path / "vocab")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "vocab", model_max_length=77)
    cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, hidden_size=32,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab),
                         projection_dim=32)
    pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=CLIPTextModel(cfg), tokenizer=tok,
                                     text_encoder_2=CLIPTextModelWithProjection(cfg), tokenizer_2=tok,
                                     scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(tmp_path / "sdxl")
    info = import_diffusers_model(tmp_path / "sdxl", tmp_path / "store" / "sdxl", "tiny-sdxl")
    assert info.family == "sdxl" and info.pipeline_class == "StableDiffusionXLPipeline"
    assert info.default_resolution == 64 and not info.test_pipeline


def test_import_takes_fp16_variant_folders_single_and_sharded(tiny_sd, tmp_path):
    """Folders holding only ``variant="fp16"`` weights (as hub snapshots of SD 1.5/SDXL often do) import;
    the store keeps them under the plain names, so they load without ``variant=``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True, dtype=torch.float16)
    src = tmp_path / "fp16"
    pipe.save_pretrained(src, variant="fp16")
    shutil.rmtree(src / "unet")
    pipe.unet.save_pretrained(src / "unet", variant="fp16", max_shard_size="40KB")  # sharded: index + shards
    unet_files = {p.name for p in (src / "unet").iterdir()}
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in unet_files
    assert not any(n in unet_files for n in ("diffusion_pytorch_model.safetensors",
                                             "diffusion_pytorch_model.fp16.safetensors"))
    assert (src / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (src / "text_encoder" / "model.fp16.safetensors").is_file()

    dest = tmp_path / "store" / "fp16"
    info = import_diffusers_model(src, dest, "tiny-fp16")
    assert info.dtype == "float16" and info.parameter_count > 100_000
    assert (dest / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (dest / "text_encoder" / "model.safetensors").is_file()
    assert (dest / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(dest, local_files_only=True, dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_import_names_the_variant_it_cannot_take(tiny_sd, tmp_path):
    src = _broken(tiny_sd, tmp_path, lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").rename(
        d / "vae" / "diffusion_pytorch_model.ema.safetensors"))
    with pytest.raises(InvalidRequestError, match=r"vae has no diffusion_pytorch_model.safetensors weights \(only "
                                                  r"diffusion_pytorch_model.ema.safetensors, a variant other than fp16"):
        import_diffusers_model(src, tmp_path / "store" / "x", "x")
    assert not (tmp_path / "store" / "x").exists()
