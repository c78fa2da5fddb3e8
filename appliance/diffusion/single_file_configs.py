"""The diffusers pipeline configs of the single-file checkpoints the appliance imports, shipped, never fetched.

A single-file checkpoint (``v1-5-pruned-emaonly.safetensors``, ``sd_xl_base_1.0.safetensors``,
and the fine-tunes people pass around) holds weights only. diffusers' ``from_single_file``
needs the pipeline's configs to know what to build; it would download them from the hub.
These are the configs of the reference repositories diffusers itself maps each checkpoint
type to (``DIFFUSERS_DEFAULT_PIPELINE_PATHS``), written out here:

* ``v1``: ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (SD 1.x, CLIP ViT-L/14, 512 px, epsilon);
* ``v2``: ``stabilityai/stable-diffusion-2-1`` (SD 2.x, OpenCLIP ViT-H/14 penultimate layer,
  768 px, v-prediction; diffusers maps SD 2.x-base checkpoints here too);
* ``xl_base``: ``stabilityai/stable-diffusion-xl-base-1.0`` (SDXL, CLIP ViT-L + OpenCLIP ViT-bigG,
  1024 px).

The tokenizers' vocabulary is built from CLIP's byte-pair merges (``assets/clip_merges.txt.gz``)
by :func:`write_clip_tokenizer`; SD 2.x's and SDXL's second tokenizer pad with ``"!"``.
``tests/unit/diffusion/test_single_file.py`` checks each config against the published parameter
counts of its models.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

_ASSETS = Path(__file__).parent / "assets"

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "trained_betas": None, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
          "skip_prk_steps": True}

_CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
           "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
           "projection_dim": 768, "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
           "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
           "torch_dtype": "float32"}

_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "sample_size": 512, "scaling_factor": 0.18215}

_SD_UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": False, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32}

_TOKENIZER = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

#: Checkpoint type (diffusers' ``infer_diffusers_model_type``) -> ``{relative path: JSON}``.
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "v1": {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
            "feature_extractor": [None, None], "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]},
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", **_BETAS},
        "text_encoder/config.json": _CLIP_L,
        "tokenizer/tokenizer_config.json": _TOKENIZER,
        "unet/config.json": {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "vae/config.json": _VAE,
    },
    "v2": {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
            "feature_extractor": [None, None], "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]},
        "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler", **_BETAS,
                                            "prediction_type": "v_prediction"},
        "text_encoder/config.json": {**_CLIP_L, "hidden_size": 1024, "intermediate_size": 4096,
                                     "num_hidden_layers": 23, "num_attention_heads": 16, "hidden_act": "gelu",
                                     "projection_dim": 512},
        "tokenizer/tokenizer_config.json": {**_TOKENIZER, "pad_token": "!"},
        "unet/config.json": {**_SD_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                             "sample_size": 96, "use_linear_projection": True, "upcast_attention": True},
        "vae/config.json": {**_VAE, "sample_size": 768},
    },
    "xl_base": {
        "model_index.json": {
            "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
        "scheduler/scheduler_config.json": {
            "_class_name": "EulerDiscreteScheduler", **_BETAS, "interpolation_type": "linear",
            "prediction_type": "epsilon", "sample_max_value": 1.0, "timestep_spacing": "leading",
            "use_karras_sigmas": False},
        "text_encoder/config.json": _CLIP_L,
        "text_encoder_2/config.json": {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"],
                                       "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                       "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280},
        "tokenizer/tokenizer_config.json": _TOKENIZER,
        "tokenizer_2/tokenizer_config.json": {**_TOKENIZER, "pad_token": "!"},
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
            "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True},
        "vae/config.json": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    },
}

#: What each checkpoint type is called in messages.
DESCRIPTIONS = {"v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x", "xl_base": "SDXL base"}


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's BPE vocabulary (49,408 tokens) and merges, as OpenAI's ``SimpleTokenizer`` builds them."""
    from appliance.diffusion.tiny import _bytes_to_unicode as bytes_to_unicode

    merges = gzip.decompress((_ASSETS / "clip_merges.txt.gz").read_bytes()).decode("utf-8").splitlines()
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_pipeline_configs(checkpoint_type: str, dest: Path) -> Path:
    """Write the configs and tokenizer files of ``checkpoint_type`` (a key of :data:`CONFIGS`) under ``dest``."""
    vocab, merges = clip_vocabulary()
    for relative, content in CONFIGS[checkpoint_type].items():
        path = Path(dest) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if path.name == "tokenizer_config.json":
            write_clip_tokenizer(path.parent, vocab, merges, pad_token=content["pad_token"])
    return Path(dest)


def write_clip_tokenizer(dest: Path, vocab: dict[str, int], merges: list[str], *, pad_token: str) -> None:
    """``vocab.json``, ``merges.txt`` and ``special_tokens_map.json`` as CLIP's hub tokenizers hold them."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
