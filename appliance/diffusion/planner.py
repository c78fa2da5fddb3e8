"""The memory planner for image jobs: a Stable Diffusion run's peak device memory, predicted before it runs.

No torch import (the API process plans each new job): parameter counts come
from the components' ``config.json`` by arithmetic that mirrors diffusers'
``UNet2DConditionModel`` and ``AutoencoderKL`` and transformers' CLIP text
models (``tests/unit/diffusion/test_planner.py`` checks them against the real
classes built on the ``meta`` device). The terms (see :func:`estimate`) follow
what :mod:`appliance.diffusion.trainer` and its recipes do:

* **weights**: frozen parts in the weight dtype (``mixed_precision``'s, or
  fp32 with ``no``): the VAE, the text encoder(s) unless trained, the UNet
  under LoRA. Trained parts in fp32 (DreamBooth's UNet; a trained text encoder
  under DreamBooth).
* **optimizer**: per trained parameter its fp32 gradient and AdamW's two
  moments (8 bytes; 2 with bitsandbytes' 8-bit AdamW), plus the LoRA weights
  themselves (fp32).
* **activations**: what autograd keeps for one micro-batch (``train_batch_size``,
  doubled by prior preservation) through the UNet, per latent pixel and per
  channel of each block (:data:`RESNET_SAVED`, :data:`TRANSFORMER_SAVED`); with
  gradient checkpointing only each checkpointed block's input plus one block
  recomputed. A trained text encoder adds its own (77 tokens: small).
* **sampling**: validation images are generated between steps (the training
  activations are free then, the weights and optimizer state are not): the
  UNet's inference activations and the VAE decoding a batch at full resolution.
* **runtime**: the CUDA context and allocator slack (as the LLM planner's).

The peak is weights + optimizer + the larger of activations and sampling + runtime.
How each constant was arrived at, and what is calibrated against published
figures versus estimated, is said where it is defined.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import InvalidRequestError
from appliance.training.planner import CUDA_RUNTIME_BYTES, GIB, MEMORY_MARGIN, Device

#: Elements autograd keeps per position for a ResnetBlock2D of ``c`` output channels, in units of ``c``,
#: and for one BasicTransformerBlock per token. First counted from diffusers' ``forward`` code (8 and 34),
#: then scaled by 1.74, the ratio of the saved bytes measured with ``torch.autograd.graph.saved_tensors_hooks``
#: (an SD 1.5-shaped UNet at a quarter of the width, 32x32 latents, fp32, on a CPU, PyTorch's fused
#: attention: 29.1k elements a latent pixel) to that first count. The same factor is assumed for both kinds.
RESNET_SAVED = 14
TRANSFORMER_SAVED = 59
#: With gradient checkpointing, what stays per latent pixel outside the recomputed blocks (their inputs, the
#: skip connections, the norms and projections around the transformers), in units of each block's ``c``:
#: measured as above with ``enable_gradient_checkpointing()``: 8 matches SD 1.5's (22 KB a latent pixel under bf16
#: autocast) within 10% and overstates SDXL's by a third. The block recomputed at a time adds its own saved set.
CHECKPOINT_SAVED = 8
#: Bytes of one saved activation element under mixed precision: most are bf16/fp16, GroupNorm and
#: LayerNorm run in fp32 under autocast; measured as above under bf16 autocast: 1.98.
MIXED_ACTIVATION_BYTES = 2.0
#: Elements per pixel (x channels of the VAE's last block) that decoding one image holds at once:
#: a resnet's input, its GroupNorm output in fp32, the SiLU and the convolution's output (estimated).
VAE_DECODE_SAVED = 6
#: Images the trainer samples at once for validation (``appliance.diffusion.trainer.SAMPLE_BATCH_SIZE``),
#: each with classifier-free guidance (two UNet rows).
SAMPLE_BATCH_SIZE = 4
#: Tokens of a prompt (CLIP's context).
PROMPT_TOKENS = 77
#: bitsandbytes' 8-bit AdamW: two 1-byte moments (plus blockwise scales, negligible).
ADAM_8BIT_BYTES = 2
ADAM_BYTES = 8

#: What scoring a batch of images with a fidelity evaluator (CLIP / DINO ViT, no gradients, 8 images at
#: 224 px: 257 tokens) holds beside the evaluator's weights, as a share of those weights: for ViT-L/14
#: (304M vision parameters, width 1024) a layer's activations for 8 x 257 tokens are ~2 M elements against
#: 12.6 M weights a layer; 0.25 allows for the attention scores and the MLP's 4x width (an estimate).
EVALUATOR_TRANSIENT = 0.25
METHODS = ("lora", "dreambooth", "dreambooth_lora")


# -- parameter counts from configs ------------------------------------------------------------------

def _conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


def _linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def _resnet(c_in: int, c_out: int, temb: int | None) -> int:
    n = 2 * c_in + _conv(c_in, c_out) + 2 * c_out + _conv(c_out, c_out)
    if temb:
        n += _linear(temb, c_out)
    if c_in != c_out:
        n += _conv(c_in, c_out, 1)
    return n


def _transformer_block(c: int, cross: int) -> int:
    """diffusers' ``BasicTransformerBlock``: self- and cross-attention (no q/k/v bias), GEGLU feed-forward."""
    attn1 = 3 * c * c + _linear(c, c)
    attn2 = c * c + 2 * cross * c + _linear(c, c)
    ff = _linear(c, 8 * c) + _linear(4 * c, c)
    return 3 * 2 * c + attn1 + attn2 + ff


def _transformer(c: int, layers: int, cross: int) -> int:
    """``Transformer2DModel``: GroupNorm, proj_in and proj_out (1x1 conv or linear: the same count), the blocks."""
    return 2 * c + 2 * _linear(c, c) + layers * _transformer_block(c, cross)


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


@dataclass(frozen=True)
class UNetShape:
    """A ``UNet2DConditionModel``'s parameters and the activations a training step keeps, from its config."""

    params: int
    #: LoRA parameters per unit of rank on ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention.
    lora_params_per_rank: int
    #: Saved activation elements per latent pixel of one image, without checkpointing.
    saved_per_pixel: float
    #: With checkpointing: the checkpointed blocks' inputs plus what stays outside them, per latent pixel.
    checkpointed_per_pixel: float
    #: The largest single block's saved elements per latent pixel (recomputed one at a time).
    largest_block_per_pixel: float
    #: Inference activations held at once per latent pixel (no autograd: a few tensors of the widest level).
    inference_per_pixel: float
    in_channels: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UNetShape:
        """Raises ``KeyError``/``ValueError`` for a block type this arithmetic does not know."""
        channels = [int(c) for c in cfg["block_out_channels"]]
        n = len(channels)
        down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
        known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        if set(down_types + up_types) - known or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in (
                "UNetMidBlock2DCrossAttn", None):
            raise ValueError("unknown UNet block types")
        layers = _per_block(cfg.get("layers_per_block", 2), n)
        tlayers = _per_block(cfg.get("transformer_layers_per_block", 1), n)
        reverse_tlayers = cfg.get("reverse_transformer_layers_per_block")
        reverse_tlayers = ([_per_block(x, 1)[0] if not isinstance(x, list) else max(x) for x in reverse_tlayers]
                           if reverse_tlayers else list(reversed(tlayers)))
        cross = cfg.get("cross_attention_dim", 1280)
        cross = int(cross[0] if isinstance(cross, (list, tuple)) else cross)
        c0, temb = channels[0], channels[0] * 4
        in_ch, out_ch = int(cfg.get("in_channels", 4)), int(cfg.get("out_channels", 4))
        params = _conv(in_ch, c0) + _linear(c0, temb) + _linear(temb, temb)
        if cfg.get("addition_embed_type") == "text_time":
            params += _linear(int(cfg["projection_class_embeddings_input_dim"]), temb) + _linear(temb, temb)
        elif cfg.get("addition_embed_type") or cfg.get("class_embed_type") or cfg.get("encoder_hid_dim"):
            raise ValueError("unknown UNet embeddings")
        lora = 0  # per rank: (d_in + d_out) per adapted linear
        saved = checkpointed = largest = 0.0

        def attention(c: int, t: int) -> int:
            nonlocal lora
            lora += t * (8 * c + 4 * c + 2 * (cross + c))  # self q,k,v,out; cross q,out (c to c); cross k,v
            return _transformer(c, t, cross)

        def act(c: int, level: int, resnets: int, t: int, attn: bool) -> None:
            nonlocal saved, checkpointed, largest
            scale = 1 / 4 ** level  # latent pixels at this level per latent pixel of the input
            block = RESNET_SAVED * c * scale
            saved += resnets * block
            checkpointed += resnets * CHECKPOINT_SAVED * c * scale
            largest = max(largest, block)
            if attn:
                tblock = TRANSFORMER_SAVED * c * scale
                saved += t * tblock + 4 * c * scale  # the blocks, GroupNorm and proj_in/out around them
                checkpointed += (t + 1) * CHECKPOINT_SAVED * c * scale
                largest = max(largest, tblock)

        prev = c0
        for i, kind in enumerate(down_types):
            c, attn = channels[i], kind.startswith("CrossAttn")
            for j in range(layers[i]):
                params += _resnet(prev if j == 0 else c, c, temb)
                if attn:
                    params += attention(c, tlayers[i])
            act(c, i, layers[i], tlayers[i], attn)
            if i < n - 1:
                params += _conv(c, c)
            prev = c
        c = channels[-1]
        params += 2 * _resnet(c, c, temb) + attention(c, tlayers[-1])
        act(c, n - 1, 2, tlayers[-1], True)
        rev = list(reversed(channels))
        rev_layers = list(reversed(layers))
        prev = rev[0]
        for i, kind in enumerate(up_types):
            c, attn = rev[i], kind.startswith("CrossAttn")
            skip_in = rev[min(i + 1, n - 1)]
            count = rev_layers[i] + 1
            for j in range(count):
                skip = skip_in if j == count - 1 else c
                params += _resnet((prev if j == 0 else c) + skip, c, temb)
                if attn:
                    params += attention(c, reverse_tlayers[i])
            act(c, n - 1 - i, count, reverse_tlayers[i], attn)
            if i < n - 1:
                params += _conv(c, c)
            prev = c
        params += 2 * c0 + _conv(c0, out_ch)
        return cls(params=params, lora_params_per_rank=lora, saved_per_pixel=saved,
                   checkpointed_per_pixel=checkpointed, largest_block_per_pixel=largest,
                   inference_per_pixel=8 * max(c / 4 ** i for i, c in enumerate(channels)), in_channels=in_ch)


def clip_text_params(cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(parameters, LoRA parameters per rank)`` of transformers' ``CLIPTextModel`` (``WithProjection``)."""
    h, i, n = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    params = int(cfg.get("vocab_size", 49408)) * h + int(cfg.get("max_position_embeddings", PROMPT_TOKENS)) * h
    params += n * (4 * _linear(h, h) + 4 * h + _linear(h, i) + _linear(i, h)) + 2 * h
    if "projection_dim" in cfg and cfg.get("architectures", ["CLIPTextModelWithProjection"])[0].endswith("Projection"):
        params += h * int(cfg["projection_dim"])
    return params, n * 4 * 2 * h


def vae_params(cfg: Mapping[str, Any]) -> int:
    """diffusers' ``AutoencoderKL`` (encoder, decoder, the two 1x1 quant convs)."""
    channels = [int(c) for c in cfg["block_out_channels"]]
    layers, latent = int(cfg.get("layers_per_block", 1)), int(cfg.get("latent_channels", 4))
    rgb_in, rgb_out = int(cfg.get("in_channels", 3)), int(cfg.get("out_channels", 3))
    top = channels[-1]
    mid = 2 * _resnet(top, top, None) + 2 * top + 4 * _linear(top, top)
    enc, prev = _conv(rgb_in, channels[0]), channels[0]
    for i, c in enumerate(channels):
        enc += sum(_resnet(prev if j == 0 else c, c, None) for j in range(layers))
        enc += _conv(c, c) if i < len(channels) - 1 else 0
        prev = c
    enc += mid + 2 * top + _conv(top, 2 * latent)
    dec, prev = _conv(latent, top) + mid, top
    rev = list(reversed(channels))
    for i, c in enumerate(rev):
        dec += sum(_resnet(prev if j == 0 else c, c, None) for j in range(layers + 1))
        dec += _conv(c, c) if i < len(rev) - 1 else 0
        prev = c
    dec += 2 * channels[0] + _conv(channels[0], rgb_out)
    return enc + dec + _conv(2 * latent, 2 * latent, 1) + _conv(latent, latent, 1)


@dataclass(frozen=True)
class ImageModelShape:
    """What memory depends on in a Stable Diffusion pipeline: its components' sizes from their configs."""

    unet: UNetShape
    #: ``(parameters, LoRA parameters per rank)`` per text encoder (two for SDXL).
    text_encoders: tuple[tuple[int, int], ...]
    text_widths: tuple[tuple[int, int], ...]
    vae: int
    vae_scale: int
    vae_top_channels: int
    default_resolution: int

    @classmethod
    def from_configs(cls, unet: Mapping[str, Any], text_encoders: Sequence[Mapping[str, Any]],
                     vae: Mapping[str, Any]) -> ImageModelShape:
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        sample = unet.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return cls(unet=UNetShape.from_config(unet), text_encoders=tuple(clip_text_params(t) for t in text_encoders),
                   text_widths=tuple((int(t["hidden_size"]), int(t["num_hidden_layers"])) for t in text_encoders),
                   vae=vae_params(vae), vae_scale=scale, vae_top_channels=int(vae["block_out_channels"][0]),
                   default_resolution=int(sample) * scale)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ImageModelShape:
        """From an imported pipeline's ``unet/``, ``text_encoder/`` (``text_encoder_2/``) and ``vae/`` configs."""
        root = Path(model_dir)

        def read(part: str) -> dict[str, Any]:
            return json.loads((root / part / "config.json").read_text())

        encoders = [read(p) for p in ("text_encoder", "text_encoder_2") if (root / p / "config.json").is_file()]
        return cls.from_configs(read("unet"), encoders, read("vae"))

    @property
    def text_params(self) -> int:
        return sum(p for p, _ in self.text_encoders)


@dataclass(frozen=True)
class ImageJobShape:
    """The settings of an image job that memory depends on (``None``: the plan chooses)."""

    method: str = "dreambooth_lora"
    resolution: int = 512
    train_batch_size: int = 1
    prior_preservation: bool = False
    mixed_precision: str = "bf16"
    train_text_encoder: bool = False
    rank: int = 4
    gradient_checkpointing: bool | None = None
    use_8bit_adam: bool | None = None
    #: parameters of the largest fidelity evaluator the job is scored with (one is on the device at a time,
    #: after sampling, while the training state stays there); 0 without evaluators
    evaluator_params: int = 0

    @property
    def micro_batch(self) -> int:
        """Images through the UNet per forward pass: prior preservation adds as many class images."""
        return self.train_batch_size * (2 if self.prior_preservation else 1)


@dataclass(frozen=True)
class ImageEstimate:
    """Predicted peak bytes, by term."""

    weights: int
    optimizer: int
    activations: int
    sampling: int
    runtime: int
    #: a fidelity evaluator scoring the sampled images (its weights and transients), after sampling
    evaluation: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.activations, self.sampling, self.evaluation) + self.runtime

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def estimate(shape: ImageModelShape, job: ImageJobShape, device_kind: str, *, checkpointing: bool,
             adam_8bit: bool) -> ImageEstimate:
    """Peak bytes of a training run of ``job`` with the given memory options."""
    b = 4 if job.mixed_precision == "no" else 2
    act_b = 4 if job.mixed_precision == "no" else MIXED_ACTIVATION_BYTES
    full = job.method == "dreambooth"
    text_trained = job.train_text_encoder
    unet = shape.unet
    if full:
        weights = unet.params * 4
        trained = unet.params
    else:
        weights = unet.params * b
        trained = unet.lora_params_per_rank * job.rank
        weights += trained * 4
    if text_trained and full:  # DreamBooth trains the whole text encoder(s) in fp32
        weights += shape.text_params * 4
        trained += shape.text_params
    else:
        weights += shape.text_params * b
        if text_trained:  # LoRA on the text encoders' attention
            lora = sum(per_rank for _, per_rank in shape.text_encoders) * job.rank
            weights += lora * 4
            trained += lora
    weights += shape.vae * b
    optimizer = trained * (4 + (ADAM_8BIT_BYTES if adam_8bit else ADAM_BYTES))

    pixels = (job.resolution // shape.vae_scale) ** 2 * job.micro_batch
    if checkpointing:
        per_pixel = unet.checkpointed_per_pixel + unet.largest_block_per_pixel
    else:
        per_pixel = unet.saved_per_pixel
    activations = pixels * per_pixel * act_b
    if full and b == 2 and not checkpointing:
        # autocast keeps a half-precision copy of each fp32 weight the forward used until the backward
        # (measured as above: the whole UNet's size again in 2 bytes; not kept under checkpointing)
        activations += unet.params * 2
    if text_trained:  # 77 tokens per prompt: small beside the UNet's
        per_token = sum(h * (n if not checkpointing else 1 + 1 / n) * TRANSFORMER_SAVED for h, n in shape.text_widths)
        activations += job.micro_batch * PROMPT_TOKENS * per_token * act_b
    latent = (job.resolution // shape.vae_scale) ** 2
    sampling = SAMPLE_BATCH_SIZE * max(2 * latent * unet.inference_per_pixel * b,
                                       job.resolution ** 2 * shape.vae_top_channels * VAE_DECODE_SAVED * b)
    runtime = CUDA_RUNTIME_BYTES if device_kind == "cuda" else 0
    evaluation = job.evaluator_params * b * (1 + EVALUATOR_TRANSIENT)  # loaded in the training dtype
    return ImageEstimate(weights=int(weights), optimizer=int(optimizer), activations=int(activations),
                         sampling=int(sampling), runtime=runtime, evaluation=int(evaluation))


@dataclass(frozen=True)
class ImagePlan:
    """The memory options chosen for an image job, and what they are predicted to need."""

    gradient_checkpointing: bool
    use_8bit_adam: bool
    estimate: ImageEstimate
    device: Device
    micro_batch: int
    resolution: int

    def to_dict(self) -> dict[str, Any]:
        """The job's ``compute.plan``."""
        return {
            "predicted_peak_bytes": self.estimate.total,
            "predicted_peak_gib": round(self.estimate.total / GIB, 2),
            "breakdown_bytes": self.estimate.to_dict(),
            "gradient_checkpointing": self.gradient_checkpointing,
            "activation_checkpointing": self.gradient_checkpointing,
            "use_8bit_adam": self.use_8bit_adam,
            "images_per_micro_batch": self.micro_batch,
            "resolution": self.resolution,
            "device": {"kind": self.device.kind, "name": self.device.name, "free_bytes": self.device.free_bytes,
                       "budget_bytes": self.device.budget},
        }


def eight_bit_available(device_kind: str) -> bool:
    """Whether ``auto`` may choose 8-bit AdamW: on a CUDA device with bitsandbytes installed."""
    return device_kind == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def _options(job: ImageJobShape, device_kind: str) -> list[tuple[bool, bool]]:
    """``(checkpointing, 8-bit Adam)`` pairs the job allows, cheapest first: checkpointing before 8-bit Adam."""
    order = [(False, False), (True, False), (True, True), (False, True)]
    if job.use_8bit_adam:  # 8-bit Adam asked for: checkpointing only if that is not enough
        order = [(False, True), (True, True)]
    if job.use_8bit_adam is None and not eight_bit_available(device_kind):
        order = [o for o in order if not o[1]]
    return [(c, a) for c, a in order
            if job.gradient_checkpointing in (None, c) and job.use_8bit_adam in (None, a)]


def plan(shape: ImageModelShape, job: ImageJobShape, device: Device) -> ImagePlan | None:
    """The cheapest memory options that fit ``device``, or ``None`` if none does."""
    for checkpointing, adam_8bit in _options(job, device.kind):
        est = estimate(shape, job, device.kind, checkpointing=checkpointing, adam_8bit=adam_8bit)
        if est.total <= device.budget:
            return ImagePlan(gradient_checkpointing=checkpointing, use_8bit_adam=adam_8bit, estimate=est,
                             device=device, micro_batch=job.micro_batch, resolution=job.resolution)
    return None


def alternatives(shape: ImageModelShape, job: ImageJobShape, device: Device) -> list[tuple[str, str]]:
    """``(field, phrase)`` for each change that would make a job that does not fit ``device`` fit, best first."""
    prefix = f"method.{job.method}.hyperparameters"
    out: list[tuple[str, str]] = []

    def fits(**changes: Any) -> ImagePlan | None:
        return plan(shape, dataclasses.replace(job, **changes), device)

    def add(field: str, phrase: str, found: ImagePlan | None) -> None:
        if found is not None:
            out.append((field, f"{phrase} (predicted peak {found.estimate.total / GIB:.1f} GiB)"))

    if job.gradient_checkpointing is False:
        add(f"{prefix}.gradient_checkpointing", f"`{prefix}.gradient_checkpointing` true or \"auto\"",
            fits(gradient_checkpointing=None))
    if job.use_8bit_adam is False and device.kind == "cuda":
        add(f"{prefix}.use_8bit_adam", f"`{prefix}.use_8bit_adam` true", fits(use_8bit_adam=True))
    if job.train_text_encoder:
        add(f"{prefix}.train_text_encoder", f"`{prefix}.train_text_encoder` false", fits(train_text_encoder=False))
    if job.method == "dreambooth":
        add("method.type", "method.type 'dreambooth_lora' instead of 'dreambooth'", fits(method="dreambooth_lora"))
    if job.mixed_precision == "no" and device.kind == "cuda":
        add(f"{prefix}.mixed_precision", f"`{prefix}.mixed_precision` 'bf16' (or 'fp16')",
            fits(mixed_precision="bf16"))
    if job.train_batch_size > 1:
        add(f"{prefix}.train_batch_size", f"`{prefix}.train_batch_size` 1 (with more "
            "`gradient_accumulation_steps` for the same images per step)", fits(train_batch_size=1))
    step = 8 * shape.vae_scale
    for resolution in (768, 512, 384, 256):
        if resolution < job.resolution and resolution % step == 0 and fits(resolution=resolution):
            add(f"{prefix}.resolution", f"`{prefix}.resolution` {resolution}", fits(resolution=resolution))
            break
    return out


def refuse(shape: ImageModelShape, job: ImageJobShape, device: Device) -> InvalidRequestError:
    """The 400 for an image job that cannot fit: what it needs, what is free, and the options that would fit."""
    options = _options(job, device.kind) or [(True, True)]
    smallest = min((estimate(shape, job, device.kind, checkpointing=c, adam_8bit=a) for c, a in options),
                   key=lambda e: e.total)
    found = alternatives(shape, job, device)
    hint = (f"; it would fit with {' or '.join(phrase for _, phrase in found)}" if found
            else "; no setting of this appliance makes it fit")
    where = f"{device.name} ({device.kind})" if device.name else device.kind
    with_what = ("with gradient checkpointing and 8-bit Adam" if options[-1] == (True, True)
                 else "with the memory options it allows")
    return InvalidRequestError(
        f"this image job needs about {smallest.total / GIB:.1f} GiB even {with_what}, but {where} has "
        f"{device.budget / GIB:.1f} GiB to give ({device.free_bytes / GIB:.1f} GiB free less a "
        f"{MEMORY_MARGIN:.0%} margin){hint}",
        param=found[0][0] if found else f"method.{job.method}.hyperparameters.resolution")
