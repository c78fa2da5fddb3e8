"""Single-file checkpoints: shipped configs that are the real models', and tiny checkpoints that round-trip."""

import json
import struct

import pytest
import torch

from appliance.diffusion.single_file import checkpoint_type, import_single_file, read_header
from appliance.diffusion.single_file_configs import CONFIGS, write_pipeline_configs
from appliance.diffusion.tiny import write_clip_vocabulary
from appliance.errors import InvalidRequestError

from .ldm_export import export_single_file

#: Published parameter counts of the reference models (UNet, VAE, text encoders), as the model cards
#: and diffusers' documentation quote them: SD 1.5's UNet 859.52M, SD 2.1's 865.91M, SDXL's 2.567B, the
#: KL-f8 VAE 83.65M, CLIP ViT-L/14's text tower 123.06M, OpenCLIP ViT-H/14's (23 layers) 340.39M,
#: OpenCLIP ViT-bigG/14's 694.66M.
PUBLISHED = {
    "v1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "v2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "xl_base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_shipped_configs_build_the_published_models(kind, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    configs = write_pipeline_configs(kind, tmp_path / kind)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    counts = {}
    with torch.device("meta"):
        for component in PUBLISHED[kind]:
            config = json.loads((configs / component / "config.json").read_text())
            if component in classes:
                model = classes[component].from_config(config)
            else:
                cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
                model = cls(CLIPTextConfig(**config))
            counts[component] = sum(p.numel() for p in model.parameters())
    assert counts == PUBLISHED[kind]
    tokenizer = CLIPTokenizer.from_pretrained(configs / "tokenizer")
    # CLIP's own ids: <|startoftext|> a photo of sks dog <|endoftext|> (sks = 48136, DreamBooth's identifier)
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    expected_pad = {"v1": 49407, "v2": 0, "xl_base": 49407}[kind]  # SD 2.x's OpenCLIP tokenizer pads with "!"
    assert tokenizer.pad_token_id == expected_pad
    if kind == "xl_base":
        assert CLIPTokenizer.from_pretrained(configs / "tokenizer_2").pad_token_id == 0


def sd_structured(tmp_path, *, xl: bool):
    """A tiny pipeline with the real models' block structure (what the LDM key layout assumes)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, _ = write_clip_vocabulary(tmp_path / "vocab")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "vocab", model_max_length=77)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4,
                        latent_channels=4, sample_size=32)
    common = dict(layers_per_block=2, norm_num_groups=4, sample_size=4, in_channels=4, out_channels=4)
    if xl:
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                              "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
            transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, cross_attention_dim=32 + 48,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 48, **common)
        # The two encoders differ in width, as CLIP-L (768) and bigG (1280) do: diffusers tells them apart so.
        wide = CLIPTextConfig(**{**text, "hidden_size": 48, "projection_dim": 48})
        pipe = StableDiffusionXLPipeline(vae=vae, unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                         text_encoder_2=CLIPTextModelWithProjection(wide),
                                         tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler(),
                                         add_watermarker=False)
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(8, 8, 16, 16), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=2,
            cross_attention_dim=32, **common)
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                       tokenizer=tok, scheduler=PNDMScheduler(skip_prk_steps=True),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = tmp_path / ("xl" if xl else "sd")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_a_single_file_checkpoint_round_trips(tmp_path, xl):
    from safetensors.torch import load_file

    source = sd_structured(tmp_path, xl=xl)
    checkpoint = export_single_file(source, tmp_path / "model.safetensors", xl=xl)
    if not xl:  # (the tiny SDXL lacks the 10th block of the second text encoder that marks a real SDXL file)
        assert checkpoint_type(read_header(checkpoint), "model.safetensors") == "v1"
    progress = []
    info = import_single_file(checkpoint, tmp_path / "store" / "m", "tiny-single", config_dir=source,
                              on_progress=progress.append)
    assert info.pipeline_class == ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    assert progress[0].startswith("converting model.safetensors") and progress[-1] == "checking the converted pipeline"
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if xl else [])
    for component in components:
        weights = "model.safetensors" if component.startswith("text") else "diffusion_pytorch_model.safetensors"
        ours, theirs = (load_file(d / component / weights) for d in (tmp_path / "store" / "m", source))
        ours.pop("text_model.embeddings.position_ids", None)
        theirs.pop("text_model.embeddings.position_ids", None)
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    assert not any(p.name.startswith(".single-file-") for p in (tmp_path / "store").iterdir())  # staging gone


def _safetensors(path, tensors: dict, header_bytes: bytes | None = None):
    from safetensors.torch import save_file

    save_file(tensors, path)
    if header_bytes is not None:
        path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes)
    return path


def test_unknown_or_malformed_files_are_refused_naming_what_was_expected(tmp_path):
    cases = {
        "weights.ckpt": (b"PK\x03\x04 pickled", "pickled checkpoint"),
        "model.onnx": (b"whatever", "not a .safetensors file"),
        "model.bin": (b"whatever", "pickled checkpoint"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidRequestError, match=message) as info:
            import_single_file(tmp_path / name, tmp_path / "store" / "x", "x")
        assert info.value.param == "src" and "single-file Stable Diffusion" in info.value.message
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    llm = _safetensors(tmp_path / "llm.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    sd3 = _safetensors(tmp_path / "refiner.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 1, 1),
        "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)})
    for path, message in [(tmp_path / "garbage.safetensors", "not a readable safetensors file"),
                          (llm, "holds no Stable Diffusion UNet"),
                          (sd3, "is a 'xl_refiner' checkpoint; single-file import takes Stable Diffusion 1.x, "
                                "Stable Diffusion 2.x, SDXL base")]:
        with pytest.raises(InvalidRequestError, match=message) as info:
            import_single_file(path, tmp_path / "store" / "x", "x")
        assert info.value.param == "src"
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_the_family_is_told_from_the_header_alone(tmp_path):
    """v2 vs v1 by the cross-attention width, SDXL by its second text encoder: only shapes are read."""
    v2 = _safetensors(tmp_path / "v2.safetensors", {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 1024)})
    xl = _safetensors(tmp_path / "xl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 1, 1),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1)})
    assert checkpoint_type(read_header(v2), "v2") == "v2"
    assert checkpoint_type(read_header(xl), "xl") == "xl_base"
