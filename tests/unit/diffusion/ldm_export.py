"""Write a diffusers pipeline as an original-layout single-file checkpoint, for the single-file import tests.

The key mappings are diffusers' own conversion scripts, copied from huggingface/diffusers
(Apache-2.0) at 58eb52c0803ea9af3abec60841c2a093bdf1f951:
``scripts/convert_diffusers_to_original_stable_diffusion.py`` (SD 1.x UNet) and
``scripts/convert_diffusers_to_original_sdxl.py`` (SDXL UNet, VAE with today's attention names,
the OpenCLIP text encoder). Like the scripts, the mappings are hard-coded for the real models' block
structure (SD: four UNet blocks, SDXL: three; two layers each; a four-block VAE), so the tiny
pipelines the tests export have that structure with a few channels.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
           ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
_UNET_TOP = [("time_embed.0.weight", "time_embedding.linear_1.weight"),
             ("time_embed.0.bias", "time_embedding.linear_1.bias"),
             ("time_embed.2.weight", "time_embedding.linear_2.weight"),
             ("time_embed.2.bias", "time_embedding.linear_2.bias"),
             ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
             ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
             ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias"),
             ("label_emb.0.0.weight", "add_embedding.linear_1.weight"),
             ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
             ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
             ("label_emb.0.2.bias", "add_embedding.linear_2.bias")]


def _unet_layers(xl: bool) -> list[tuple[str, str]]:
    out = []
    blocks, up_layers = (3, 4) if xl else (4, 3)
    for i in range(blocks):
        for j in range(2):
            out.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if (i > 0) if xl else (i < 3):
                out.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(up_layers if xl else 3):
            out.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if (i < 2) if xl else (i > 0):
                out.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            out.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            out.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    if xl:
        out.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))
    out.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        out.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return out


def convert_unet(state: dict[str, torch.Tensor], xl: bool) -> dict[str, torch.Tensor]:
    mapping = {k: k for k in state}
    for sd_name, hf_name in _UNET_TOP:
        if hf_name in mapping:
            mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in _RESNET:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    layers = _unet_layers(xl)
    for k, v in mapping.items():
        for sd_part, hf_part in layers:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {v: state[k] for k, v in mapping.items()}


def convert_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    conversion = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            conversion.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            conversion.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            conversion.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            conversion.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        conversion.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    mapping = {k: k for k in state}
    for k, v in mapping.items():
        for sd_part, hf_part in conversion:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in attention:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    out = {v: state[k] for k, v in mapping.items()}
    for k, v in out.items():
        if any(f"mid.attn_1.{w}.weight" in k for w in ("q", "k", "v", "proj_out")) and v.ndim != 1:
            out[k] = v.reshape(*v.shape, 1, 1)
    return out


_OPENCLIP = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"),
             ("ln_2", "layer_norm2"), (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
             ("ln_final.", "text_model.final_layer_norm."),
             ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
_PROTECTED = {re.escape(hf): sd for sd, hf in _OPENCLIP}
_PATTERN = re.compile("|".join(_PROTECTED))


def convert_openclip_text_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, list]] = {"weight": {}, "bias": {}}
    for k, v in state.items():
        match = re.search(r"\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if match:
            prefix = k[: match.start()] + ".self_attn"
            qkv[match.group(2)].setdefault(prefix, [None, None, None])["qkv".index(match.group(1))] = v
            continue
        out[_PATTERN.sub(lambda m: _PROTECTED[re.escape(m.group(0))], k)] = v
    for kind, captured in qkv.items():
        for prefix, parts in captured.items():
            out[_PATTERN.sub(lambda m: _PROTECTED[re.escape(m.group(0))], prefix) + f".in_proj_{kind}"] = torch.cat(parts)
    return out


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves a CLIP text model's tensors without the ``text_model.`` prefix the original
    checkpoints (and transformers 4's files) carry; the projection stays outside it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state.items()}


def export_single_file(pipeline_dir: Path, dest: Path, *, xl: bool) -> Path:
    """``pipeline_dir`` (a saved diffusers SD 1.x or SDXL pipeline) as one original-layout ``.safetensors``."""
    pipeline_dir = Path(pipeline_dir)
    unet = load_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    text = _text_model_keys(load_file(pipeline_dir / "text_encoder" / "model.safetensors"))
    state = {f"model.diffusion_model.{k}": v for k, v in convert_unet(unet, xl).items()}
    state.update({f"first_stage_model.{k}": v for k, v in convert_vae(vae).items()})
    if xl:
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()})
        text_2 = convert_openclip_text_encoder(
            _text_model_keys(load_file(pipeline_dir / "text_encoder_2" / "model.safetensors")))
        state.update({f"conditioner.embedders.1.model.{k}": v for k, v in text_2.items()})
        projection = state.pop("conditioner.embedders.1.model.text_projection.weight")
        state["conditioner.embedders.1.model.text_projection"] = projection.T.contiguous()
    else:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, dest)
    return Path(dest)
