"""The image training entry point: dataset bytes in, artefact bytes out, nothing on disk.

:func:`train_images` reads the sanitised dataset zip, loads the base Stable
Diffusion pipeline (1.x/2.x or SDXL), resolves ``"auto"`` hyperparameters, generates "before"
images for the instance prompt (and class images for prior preservation),
runs the optimizer steps of diffusers' training scripts (latents from the
VAE, DDPM noise, MSE on the scheduler's prediction type, optional Min-SNR
weighting, prior loss) with events, checkpoints, validation images and
cancellation, then generates "after" images and returns the artefact.

SDXL follows ``train_dreambooth_lora_sdxl.py``: the prompt is the concatenated
penultimate hidden states of both text encoders, the second one's projected
pooled output and six ``add_time_ids`` (original size, crop top-left, target
size) condition the UNet, and with ``train_text_encoder`` both encoders train.
Uploaded images of mixed shapes go into aspect-ratio buckets of about
``resolution``² pixels (the crop is recorded in their ``add_time_ids``) instead of
being centre-cropped square; a micro-batch mixing buckets runs one UNet pass
per bucket.

Reproducible by construction: the images of step ``k`` and its noise and
timesteps are drawn from generators seeded by ``(seed, k)``, so a resumed run
ends with the same weights as an uninterrupted one on the same device.
Offline: the base model is a local directory (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from appliance.diffusion import checkpoint as ckpt
from appliance.diffusion.compat import text_encoder_lora_supported
from appliance.diffusion.data import ImageDataset, read_image_dataset
from appliance.diffusion.evaluation import FIDELITY_METRIC, IMAGES_PER_PROMPT, Evaluators, evaluation_prompts
from appliance.diffusion.evaluation import describe as describe_learned
from appliance.diffusion.fidelity import fidelity_proxy, grid_png
from appliance.diffusion.hyperparameters import ImageTrainingSpec, resolve, uses_prior_preservation
from appliance.diffusion.protocol import Models, Setup
from appliance.diffusion.registry import get_recipe
from appliance.diffusion.results import ImageTrainingEvent, ImageTrainMetrics, ImageTrainResult
from appliance.errors import InvalidRequestError
from appliance.trainkit import checkpoint as kit
from appliance.trainkit.checkpoint import CheckpointOpener
from appliance.trainkit.device import pick_device
from appliance.trainkit.errors import Cancelled, check_finite_loss, require_positive_int
from appliance.trainkit.events import ProgressWindow
from appliance.training.memory import measured_peak, peak_resident_reset

#: Fixed as in diffusers' training scripts (``--adam_*``, ``--max_grad_norm``, ``--lr_scheduler constant``).
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8
MAX_GRAD_NORM = 1.0
#: Images per sampling batch (``--sample_batch_size``) and generations per grid row (``--num_validation_images``).
SAMPLE_BATCH_SIZE = 4
NUM_VALIDATION_IMAGES = 4
LOSS_WINDOW = 50
TRAINABLE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: Aspect-ratio buckets (SDXL) span 1:2 to 2:1.
MAX_BUCKET_RATIO = 2.0


def train_images(
    spec: ImageTrainingSpec,
    model_dir: Path,
    dataset: bytes,
    *,
    class_dataset: bytes | None = None,
    on_event: Callable[[ImageTrainingEvent], None] | None = None,
    on_checkpoint: Callable[[int, bytes], None] | None = None,
    open_checkpoint: CheckpointOpener | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: bytes | None = None,
    device: str = "auto",
    event_every_steps: int = 10,
    sample_steps: int = 25,
    guidance_scale: float | None = None,
    clip_model: Path | None = None,
    dino_model: Path | None = None,
) -> ImageTrainResult:
    """Fine-tune a Stable Diffusion model on an in-memory image dataset.

    Args:
        spec: Method and hyperparameters (:meth:`ImageTrainingSpec.from_method`).
        model_dir: An imported Stable Diffusion 1.x/2.x or SDXL pipeline directory
            (:func:`appliance.diffusion.import_diffusers_model`).
        dataset: The sanitised dataset zip (:mod:`appliance.diffusion.data`).
        class_dataset: With prior preservation (``class_prompt``): an uploaded dataset zip of class
            images, used before any generated ones; ``num_class_images`` ("auto": as many as were
            uploaded) beyond its count are generated, as diffusers' DreamBooth scripts top up their
            ``--class_data_dir``.
        on_event: Called with an :class:`ImageTrainingEvent` every ``event_every_steps``
            steps, at the last step, for validation images and for phases.
        on_checkpoint: Called with ``(step, checkpoint_bytes)`` every ``checkpoint_every_steps``
            steps (not at the last step: the result carries the final artefact).
        should_stop: Polled before every step and every sampling batch; when it
            returns true the run stops and returns a ``cancelled`` result.
        open_checkpoint: Instead of ``on_checkpoint``: called with the step, returns a context manager
            whose binary file the checkpoint is serialised into as it is written (the worker's stream
            to the control plane), so a multi-GB DreamBooth checkpoint is never whole in memory.
        resume_from: Bytes from ``on_checkpoint``; the run continues from there and
            ends with the same weights as an uninterrupted run (same spec, data and device).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        event_every_steps: Steps between ``train`` events.
        sample_steps: Denoising steps for class, validation and before/after images.
        guidance_scale: Classifier-free guidance for those images; ``None`` = the pipeline's default.
        clip_model: An imported ``CLIPModel`` evaluator folder (:mod:`appliance.diffusion.evaluators`): CLIP-I and
            CLIP-T are measured before and after training, on the instance prompt's generations and on
            ``IMAGES_PER_PROMPT`` generations per held-out prompt (``evaluation_prompts``).
        dino_model: An imported DINO ``ViTModel``/``Dinov2Model`` folder: DINO is measured on the same generations.

    Returns:
        An :class:`ImageTrainResult`.

    Raises:
        InvalidRequestError: Bad dataset, hyperparameters, model, device or checkpoint.
        TrainingDivergedError: The loss became non-finite.
    """
    model_dir = Path(model_dir)
    emit = on_event or (lambda event: None)
    stop = should_stop or (lambda: False)
    require_positive_int("event_every_steps", event_every_steps)
    require_positive_int("sample_steps", sample_steps)
    torch_device = pick_device(device)
    recipe = get_recipe(spec.method)
    data = read_image_dataset(dataset)
    uploaded = read_image_dataset(class_dataset, param="class_images_file") if class_dataset is not None else None
    if uploaded is not None and getattr(spec.hyperparameters, "class_prompt", None) is None:
        raise InvalidRequestError("`class_images_file` needs `class_prompt`: the prompt the class images are "
                                  "trained with (prior preservation)", param="class_images_file")
    pipeline_class = _check_trainable(model_dir)

    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    resident_before = peak_resident_reset() if torch_device.type == "cpu" else None
    models = _load_models(model_dir, torch_device, pipeline_class)
    if resident_before is not None:  # loading's page-cache peak is host memory, not training's
        peak_resident_reset()
    vae_scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    hp = resolve(
        spec.hyperparameters,
        n_images=len(data.images),
        n_class_images=len(uploaded.images) if uploaded is not None else None,
        default_resolution=int(models.unet.config.sample_size) * vae_scale,
        size_multiple=vae_scale,
        device_type=torch_device.type,
        bf16_supported=torch_device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    prefix = f"method.{spec.method}.hyperparameters"
    if hp.train_text_encoder and recipe.capabilities.output == "adapter":  # LoRA on the text encoder: fail early
        supported, why = text_encoder_lora_supported()
        if not supported:
            raise InvalidRequestError(f"`train_text_encoder` with LoRA is not available on this appliance: {why}; "
                                      "set it to false", param=f"{prefix}.train_text_encoder")
    instance_prompt = hp.instance_prompt or data.instance_prompt
    prompts = recipe.prompts(data, instance_prompt)
    sample_prompt = instance_prompt or prompts[0]
    prior = uses_prior_preservation(hp)
    total_steps = hp.max_train_steps
    fingerprint = _fingerprint(data, prompts)
    resume = ckpt.load_resume(resume_from, spec.method, hp, fingerprint, total_steps)
    save_checkpoint = ckpt.CHECKPOINT.saver(on_checkpoint, open_checkpoint)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[hp.mixed_precision]
    amp = hp.mixed_precision != "no"
    details: dict[str, Any] = {
        "device": str(torch_device), "pipeline_class": pipeline_class, "mixed_precision": hp.mixed_precision,
        "prediction_type": models.noise_scheduler.config.prediction_type, "instance_prompt": instance_prompt,
        "sample_prompt": sample_prompt, "prior_preservation": prior,
        "class_prompt": getattr(hp, "class_prompt", None), "sample_steps": sample_steps,
        "center_crop": not models.xl,
    }
    buckets = _buckets(hp.resolution, vae_scale * 2 ** (len(models.unet.config.block_out_channels) - 1)) \
        if models.xl else None

    def event(kind: str, step: int, **fields: Any) -> None:
        emit(ImageTrainingEvent(type=kind, step=step, total_steps=total_steps, **fields))

    sampler = _Sampler(models, torch_device, weight_dtype if amp else None, sample_steps, guidance_scale, hp.seed, stop)
    references = [_center_crop(im, hp.resolution) for im in data.images]
    fidelity = _Fidelity.start(clip_model, dino_model, torch_device, weight_dtype, sampler, data, hp, sample_prompt,
                               prompts, details, event)
    state = _RunState()
    images: dict[str, bytes] = {}
    # Seeded inside a fork so the caller's global RNG state is left untouched.
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(hp.seed)
        try:
            if resume is not None:
                before_png, state.before = resume["before_grid"], fidelity.resumed(resume["before_metrics"])
                before_images = None
            else:
                before_images = sampler.sample(sample_prompt, NUM_VALIDATION_IMAGES, hp.resolution, offset=0)
                state.before = {**fidelity_proxy(before_images, references), **fidelity.measure(before_images),
                                "evaluators": fidelity.names}
                before_png = b""
                event("info", 0, message=f"before training: {fidelity.describe(state.before)}")
            class_pixels = None
            if prior:
                given = uploaded.images[:hp.num_class_images] if uploaded is not None else []
                generated = (sampler.sample(hp.class_prompt, hp.num_class_images - len(given), hp.resolution,
                                            offset=10**6) if hp.num_class_images > len(given) else [])
                class_images = [*given, *generated]
                details["class_images"] = {"uploaded": len(given), "generated": len(generated)}
                class_digest = hashlib.sha256(b"".join(im.tobytes() for im in class_images)).hexdigest()
                if resume is not None and resume["class_digest"] != class_digest:
                    raise InvalidRequestError(
                        "`resume_from` cannot continue this run: the class images came out differently "
                        "(another device or library version?)", param="resume_from")
                state.class_digest = class_digest
                class_pixels = _prepare(class_images, hp.resolution, buckets)
                counted = (f"{len(given)} uploaded" + (f" and {len(generated)} generated" if generated else "")
                           if given else f"generated {len(generated)}")
                event("info", 0, message=f"{counted} class images for {hp.class_prompt!r}")
            instance_pixels = _prepare(data.images, hp.resolution, buckets)
            if buckets is not None:
                details["aspect_ratio_buckets"] = counts = _bucket_counts(instance_pixels)
                event("info", 0, message=f"{len(data.images)} images in {len(counts)} aspect-ratio bucket(s) of "
                      f"about {hp.resolution}x{hp.resolution} pixels: "
                      + ", ".join(f"{size} ({n})" for size, n in counts.items()))
            instance = _encode_images(models, instance_pixels, torch_device)
            klass = _encode_images(models, class_pixels, torch_device) if class_pixels is not None else None
        except Cancelled:
            return _cancelled(hp, state, data, details, images, total_steps, 0, fidelity)

        with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
            torch.manual_seed(hp.seed)  # LoRA initialisation
            setup = recipe.setup(models, hp, weight_dtype)
        details.update(setup.details)
        details["trainable_parameters"] = sum(p.numel() for p in setup.trainable.values())
        if weight_dtype != torch.float32:
            models.vae.to(dtype=weight_dtype)
        if hp.gradient_checkpointing:  # recompute activations in the backward pass: less memory, slower steps
            models.unet.enable_gradient_checkpointing()
            if setup.train_text_encoder:
                for encoder in models.text_encoders().values():
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = _optimizer(list(setup.trainable.values()), hp, prefix)
        details["gradient_checkpointing"] = hp.gradient_checkpointing
        details["optimizer"] = "adamw_8bit" if hp.use_8bit_adam else "adamw"
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # diffusers' "constant"
        scaler = torch.amp.GradScaler("cuda") if hp.mixed_precision == "fp16" else None
        texts = _TextConditioning(models, setup, prompts, getattr(hp, "class_prompt", None), torch_device)
        if resume is not None:
            _restore(setup, optimizer, scheduler, scaler, resume, state)

        models.unet.train()
        if setup.train_text_encoder:
            for encoder in models.text_encoders().values():
                encoder.train()
        try:
            window = ProgressWindow()
            train_seconds_before = state.train_seconds
            while state.step < total_steps:
                if stop():
                    raise Cancelled
                loss, n_images = _train_step(models, setup, optimizer, scheduler, scaler, texts, instance, klass,
                                             hp, state.step, torch_device, weight_dtype if amp else None)
                check_finite_loss(loss, state.step, hp.learning_rate, f"{prefix}.learning_rate")
                state.step += 1
                state.losses = (state.losses + [loss])[-LOSS_WINDOW:]
                state.session_images += n_images
                window.add(loss, n_images)
                last = state.step == total_steps
                if state.step % event_every_steps == 0 or last:
                    train_loss, images_per_second = window.flush()
                    event("train", state.step, train_loss=train_loss, learning_rate=scheduler.get_last_lr()[0],
                          images_per_second=images_per_second)
                with window.paused():  # validation and checkpoints are not training time
                    if hp.validation_every_steps and state.step % hp.validation_every_steps == 0 and not last:
                        shown = sampler.sample(sample_prompt, NUM_VALIDATION_IMAGES, hp.resolution, offset=0)
                        name = f"validation_step_{state.step:06d}.png"
                        images[name] = grid_png([shown])
                        event("validation", state.step, message=f"validation images for {sample_prompt!r}: "
                              f"{_describe(fidelity_proxy(shown, references))}", images={name: images[name]})
                    if save_checkpoint and hp.checkpoint_every_steps and state.step % hp.checkpoint_every_steps == 0 \
                            and not last:
                        if not before_png:
                            before_png = _before_grid(references, before_images)
                        save_checkpoint(state.step, _checkpoint(recipe, models, setup, optimizer, scheduler, scaler,
                                                              state, spec, hp, fingerprint, before_png))
            state.train_seconds = train_seconds_before + window.elapsed()
            details["memory"] = measured_peak(torch_device, resident_before)
            after_images = sampler.sample(sample_prompt, NUM_VALIDATION_IMAGES, hp.resolution, offset=0)
            after = {**fidelity_proxy(after_images, references), **fidelity.measure(after_images)}
        except Cancelled:
            images["before_after.png"] = grid_png([references, before_images or []]) if before_images else before_png
            return _cancelled(hp, state, data, details, images, total_steps, _class_count(klass), fidelity)
        event("info", state.step, message=f"after training: {fidelity.describe(after)}")
        fidelity.report(state.step)
        if before_images is None:  # resumed: the before row comes from the checkpoint's grid
            images["before_after.png"] = _append_row(before_png, after_images)
        else:
            images["before_after.png"] = grid_png([references, before_images, after_images])
        artifacts = recipe.save(models, setup)

    return ImageTrainResult(
        status="succeeded",
        artifacts=artifacts,
        images=images,
        hyperparameters=hp,
        metrics=_metrics(state, after, total_steps, data, _class_count(klass), fidelity),
        details=details,
    )


# --------------------------------------------------------------------------- state and results


@dataclass
class _RunState:
    """Counters a checkpoint carries across a resume."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    session_images: int = 0  # this call only, for images/s
    before: dict[str, Any] | None = None  # proxy and learned figures, and the evaluators that measured them
    class_digest: str | None = None


def _class_count(klass: _Latents | None) -> int:
    return 0 if klass is None else len(klass)


def _metrics(state: _RunState, after: dict[str, Any] | None, total_steps: int, data: ImageDataset,
             n_class: int, fidelity: _Fidelity) -> ImageTrainMetrics:
    before = state.before or {}
    after = after or {}
    learned = {f"{key}_{when}": scores.get(key) for key in ("clip_i", "dino", "clip_t")
               for when, scores in (("before", before), ("after", after))}
    if fidelity.evaluators is not None:
        learned.update(fidelity_evaluators=fidelity.evaluators.names, fidelity_metric=FIDELITY_METRIC)
    return ImageTrainMetrics(
        steps=state.step,
        total_steps=total_steps,
        train_loss=(sum(state.losses) / len(state.losses)) if state.losses else None,
        train_seconds=state.train_seconds,
        images_per_second=state.session_images / state.train_seconds if state.train_seconds > 0 else 0.0,
        n_instance_images=len(data.images),
        n_class_images=n_class,
        subject_fidelity_proxy_color_histogram_before=before.get("color_histogram"),
        subject_fidelity_proxy_color_histogram_after=after.get("color_histogram"),
        subject_fidelity_proxy_mean_color_distance_before=before.get("mean_color_distance"),
        subject_fidelity_proxy_mean_color_distance_after=after.get("mean_color_distance"),
        **learned,
    )


def _cancelled(hp: Any, state: _RunState, data: ImageDataset, details: dict[str, Any], images: dict[str, bytes],
               total_steps: int, n_class: int, fidelity: _Fidelity) -> ImageTrainResult:
    return ImageTrainResult(status="cancelled", artifacts=None, images=images, hyperparameters=hp,
                            metrics=_metrics(state, None, total_steps, data, n_class, fidelity), details=details)


def _describe(scores: dict[str, float]) -> str:
    return (f"colour-histogram proxy {scores['color_histogram']:.3f}, "
            f"mean-colour distance proxy {scores['mean_color_distance']:.3f}")


class _Fidelity:
    """The learned fidelity figures of a run (CLIP-I, DINO, CLIP-T), when evaluator models were given.

    Evaluators load once, on the CPU in the training dtype, and move to the training device only while they
    embed. Each measurement generates ``IMAGES_PER_PROMPT`` images per held-out prompt (seeded apart from
    the instance prompt's) and scores them with the instance prompt's generations against the instance images.
    """

    def __init__(self, evaluators: Evaluators | None, sampler: _Sampler, real: list, prompts: list[str],
                 resolution: int, emit: Callable[..., None]) -> None:
        self.evaluators, self.sampler, self.real, self.prompts = evaluators, sampler, real, prompts
        self.resolution, self.emit, self.seconds = resolution, emit, 0.0

    @classmethod
    def start(cls, clip_model: Path | None, dino_model: Path | None, device: torch.device, dtype: torch.dtype,
              sampler: _Sampler, data: ImageDataset, hp: Any, sample_prompt: str, trained: list[str],
              details: dict[str, Any], emit: Callable[..., None]) -> _Fidelity:
        if clip_model is None and dino_model is None:
            details["fidelity"] = {"evaluators": None, "metric": "proxy only (no evaluator model imported)"}
            return cls(None, sampler, [], [], hp.resolution, emit)
        began = time.monotonic()

        def unusable(family: str, folder: Path, exc: Exception) -> None:
            # A broken evaluator costs its figures, not the job: the other's and the proxy are still measured
            emit("warning", 0, message=f"evaluator {folder.name!r} ({'CLIP' if family == 'clip' else 'DINO'}) could "
                 f"not be loaded ({type(exc).__name__}): its fidelity figures are not measured; re-import it")

        evaluators = Evaluators(clip_model, dino_model, device, dtype, on_error=unusable)
        if not evaluators.names:
            details["fidelity"] = {"evaluators": None, "metric": "proxy only (no evaluator model could be loaded)"}
            return cls(None, sampler, [], [], hp.resolution, emit)
        prompts = evaluation_prompts(sample_prompt, getattr(hp, "evaluation_prompts", None))
        overlap = sorted(set(prompts) & set(trained))
        if overlap:
            emit("warning", 0, message=f"evaluation prompt {overlap[0]!r} is also a training prompt: CLIP-T on it "
                 "is not held out; choose `evaluation_prompts` the job does not train on")
        out = cls(evaluators, sampler, list(data.images), prompts, hp.resolution, emit)
        out.seconds = time.monotonic() - began
        details["fidelity"] = {"evaluators": evaluators.names, "evaluation_prompts": prompts,
                               "images_per_prompt": IMAGES_PER_PROMPT, "real_images": len(data.images),
                               "dtype": str(dtype).removeprefix("torch.")}
        return out

    @property
    def names(self) -> dict[str, str] | None:
        return self.evaluators.names if self.evaluators is not None else None

    def measure(self, generated: list) -> dict[str, float]:
        """CLIP-I/DINO of ``generated`` plus the held-out prompts' generations, CLIP-T of the latter; {} without evaluators."""
        if self.evaluators is None:
            return {}
        began = time.monotonic()
        prompted = []
        for i, prompt in enumerate(self.prompts):
            shown = self.sampler.sample(prompt, IMAGES_PER_PROMPT, self.resolution, offset=2 * 10**6 + 1000 * i)
            prompted += [(prompt, image) for image in shown]
        scores = self.evaluators.score([*generated, *(im for _, im in prompted)], self.real, prompted)
        self.seconds += time.monotonic() - began
        return scores

    def resumed(self, before: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's "before" figures, without learned ones another evaluator (or none) measured."""
        names = self.names
        if before.get("evaluators") == names:
            return before
        if names is not None:
            self.emit("warning", 0, message="the checkpoint's before-training figures were measured without the "
                      f"evaluators {', '.join(names.values())}: CLIP-I/DINO/CLIP-T before training are not reported")
        return {k: v for k, v in before.items() if k not in ("clip_i", "dino", "clip_t", "evaluators")}

    def describe(self, scores: dict[str, Any]) -> str:
        learned = describe_learned(scores, self.evaluators.names) if self.evaluators is not None else ""
        return (f"{learned}; " if learned else "") + _describe(scores)

    def report(self, step: int) -> None:
        if self.evaluators is not None:
            self.emit("info", step, message=f"fidelity evaluation ({len(self.prompts)} held-out prompts x "
                      f"{IMAGES_PER_PROMPT} images, before and after) added {self.seconds:.1f} s to the run")


# --------------------------------------------------------------------------- loading


def _check_trainable(model_dir: Path) -> str:
    index_path = model_dir / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"`model_dir` {model_dir.name} is not a diffusers pipeline directory "
                                  f"(model_index.json: {exc})", param="model") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in TRAINABLE_PIPELINES:
        raise InvalidRequestError(
            f"`model_dir` {model_dir.name} is a {name!r}; image training supports "
            f"{', '.join(TRAINABLE_PIPELINES)} (Stable Diffusion 1.x/2.x and SDXL)", param="model")
    return name


def _load_models(model_dir: Path, device: torch.device, pipeline_class: str) -> Models:
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if pipeline_class == "StableDiffusionXLPipeline":
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, local_files_only=True, add_watermarker=False,
                                                         dtype=torch.float32)
        xl = {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir, local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, dtype=torch.float32,
        )
        xl = {}
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, xl.get("text_encoder_2")):
        if part is not None:
            part.to(device)
    pipe.vae.requires_grad_(False)
    return Models(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        sample_scheduler=pipe.scheduler, **xl,
    )


# --------------------------------------------------------------------------- images and sampling


def _optimizer(params: list[torch.nn.Parameter], hp: Any, prefix: str) -> torch.optim.Optimizer:
    """AdamW with the scripts' betas, weight decay and epsilon; bitsandbytes' 8-bit AdamW with ``use_8bit_adam``
    (as ``--use_8bit_adam``: both moments in 8 bits, blockwise scaled, for tensors of 4096 elements or more)."""
    kwargs = {"lr": hp.learning_rate, "betas": ADAM_BETAS, "weight_decay": ADAM_WEIGHT_DECAY, "eps": ADAM_EPSILON}
    if not hp.use_8bit_adam:
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise InvalidRequestError(f"`use_8bit_adam` needs bitsandbytes, which is not installed here ({exc}); set it "
                                  "to false", param=f"{prefix}.use_8bit_adam") from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def _center_crop(image, size: int):
    """Resize the shorter side to ``size`` (bilinear) and crop the centre, as the scripts' ``--center_crop``."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    resized = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


@dataclass
class _Pixels:
    """Training images as ``(3, H, W)`` float32 tensors in [-1, 1] and their SDXL ``add_time_ids``."""

    images: list[torch.Tensor]
    time_ids: torch.Tensor  # (N, 6): original height, width, crop top, left, target height, width


@dataclass
class _Latents:
    """Each image's VAE posterior (``(C, h, w)`` mean and std) and its ``add_time_ids``."""

    mean: list[torch.Tensor]
    std: list[torch.Tensor]
    time_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.mean)


def _buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets ``(width, height)``: multiples of ``multiple``, each the largest such height for its
    width under ``resolution``² pixels, from 1:``MAX_BUCKET_RATIO`` to ``MAX_BUCKET_RATIO``:1 (kohya's and
    SDXL's own training buckets are built the same way)."""
    area, out = resolution * resolution, set()
    for width in range(multiple, int(resolution * MAX_BUCKET_RATIO) + 1, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and max(width, height) / min(width, height) <= MAX_BUCKET_RATIO:
            out.add((width, height))
    return sorted(out)


def _bucket_for(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (on a log scale); the larger one on a tie."""
    import math

    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def _prepare(images: list, resolution: int, buckets: list[tuple[int, int]] | None) -> _Pixels:
    """Each image resized to cover its bucket and centre-cropped to it (``buckets=None``: the square
    ``resolution``, as the scripts' ``--center_crop``), with ``(orig h, orig w, top, left, h, w)`` for SDXL."""
    import numpy as np
    from PIL import Image

    tensors, ids = [], []
    for image in images:
        w, h = image.size
        bw, bh = _bucket_for(w, h, buckets) if buckets is not None else (resolution, resolution)
        scale = max(bw / w, bh / h)
        resized = image.convert("RGB").resize((max(bw, round(w * scale)), max(bh, round(h * scale))),
                                              Image.BILINEAR)
        left, top = (resized.width - bw) // 2, (resized.height - bh) // 2
        array = np.asarray(resized.crop((left, top, left + bw, top + bh)), dtype=np.float32)
        tensors.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
        ids.append((h, w, top, left, bh, bw))
    return _Pixels(tensors, torch.tensor(ids, dtype=torch.float32).reshape(-1, 6))


def _bucket_counts(pixels: _Pixels) -> dict[str, int]:
    counts: dict[str, int] = {}
    for image in pixels.images:
        key = f"{image.shape[2]}x{image.shape[1]}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _by_shape(shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """Indices grouped by shape, groups in order of first appearance, indices in order within each."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    return list(groups.values())


@torch.no_grad()
def _encode_images(models: Models, pixels: _Pixels, device: torch.device) -> _Latents:
    """The VAE posterior (mean, std) of each image; latents are sampled from it every step, as the scripts do."""
    n = len(pixels.images)
    means: list[torch.Tensor | None] = [None] * n
    stds: list[torch.Tensor | None] = [None] * n
    for group in _by_shape([tuple(t.shape) for t in pixels.images]):
        for start in range(0, len(group), 8):
            chunk = group[start : start + 8]
            batch = torch.stack([pixels.images[i] for i in chunk]).to(device, dtype=models.vae.dtype)
            dist = models.vae.encode(batch).latent_dist
            for j, i in enumerate(chunk):
                means[i], stds[i] = dist.mean[j].float(), dist.std[j].float()
    return _Latents(means, stds, pixels.time_ids.to(device))


class _Sampler:
    """Generates images with the current weights; seeds make "before" and "after" comparable."""

    def __init__(self, models: Models, device: torch.device, autocast_dtype: torch.dtype | None, steps: int,
                 guidance_scale: float | None, seed: int, stop: Callable[[], bool]) -> None:
        self.models, self.device, self.autocast_dtype = models, device, autocast_dtype
        self.steps, self.guidance_scale, self.seed, self.stop = steps, guidance_scale, seed, stop

    def sample(self, prompt: str, n: int, size: int, *, offset: int) -> list:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        m = self.models
        scheduler = type(m.sample_scheduler).from_config(m.sample_scheduler.config)
        if m.xl:
            pipe = StableDiffusionXLPipeline(
                vae=m.vae, text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2, tokenizer=m.tokenizer,
                tokenizer_2=m.tokenizer_2, unet=m.unet, scheduler=scheduler, add_watermarker=False,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        modes = [(part, part.training) for part in (m.unet, *m.text_encoders().values())]
        for part, _ in modes:
            part.eval()
        extra = {} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale}
        out = []
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for start in range(0, n, SAMPLE_BATCH_SIZE):
                    if self.stop():
                        raise Cancelled
                    count = min(SAMPLE_BATCH_SIZE, n - start)
                    generators = [torch.Generator("cpu").manual_seed(self.seed + offset + start + i)
                                  for i in range(count)]
                    context = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                               if self.autocast_dtype is not None else nullcontext())
                    with context, torch.no_grad():
                        result = pipe([prompt] * count, height=size, width=size, num_inference_steps=self.steps,
                                      generator=generators, **extra)
                    out.extend(result.images)
        finally:
            for part, was_training in modes:
                part.train(was_training)
        return out


def _before_grid(references: list, before_images: list | None) -> bytes:
    return grid_png([references, before_images or []])


def _append_row(grid: bytes, row: list) -> bytes:
    """Add a row of images under an existing grid PNG (tiles the grid's height / rows wide)."""
    import io

    from PIL import Image

    base = Image.open(io.BytesIO(grid)).convert("RGB")
    tile = base.height // 2
    canvas = Image.new("RGB", (max(base.width, tile * len(row)), base.height + tile), "white")
    canvas.paste(base, (0, 0))
    strip = Image.open(io.BytesIO(grid_png([row], tile=tile)))
    canvas.paste(strip, (0, base.height))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------- the step


class _TextConditioning:
    """Prompt embeddings: computed once when the text encoders are frozen, per step when they train.

    SD 1.x/2.x: the text encoder's last hidden state. SDXL (as the pipeline and diffusers' SDXL scripts):
    both encoders' penultimate hidden states, concatenated, and the second one's projected pooled output.
    """

    def __init__(self, models: Models, setup: Setup, prompts: list[str], class_prompt: str | None,
                 device: torch.device) -> None:
        self.models, self.trains = models, setup.train_text_encoder
        unique = sorted(set(prompts) | ({class_prompt} if class_prompt else set()))
        tokenizers = [models.tokenizer] + ([models.tokenizer_2] if models.xl else [])
        self.ids = [tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device) for tok in tokenizers]
        self.index = {p: i for i, p in enumerate(unique)}
        self.prompt_ids = [self.index[p] for p in prompts]
        self.class_id = self.index[class_prompt] if class_prompt else None
        self.cached = None
        if not self.trains:
            with torch.no_grad():
                self.cached = self._encode(list(range(len(unique))))

    def _encode(self, which: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.models
        if not m.xl:
            return m.text_encoder(self.ids[0][which], return_dict=False)[0], None
        states = []
        for encoder, ids in zip((m.text_encoder, m.text_encoder_2), self.ids, strict=True):
            out = encoder(ids[which], output_hidden_states=True, return_dict=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), out.text_embeds

    def embed(self, which: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(encoder hidden states, pooled embeddings or None)`` for prompts ``which``."""
        if self.cached is not None:
            states, pooled = self.cached
            return states[which], (pooled[which] if pooled is not None else None)
        return self._encode(which)


def _stream_positions(n: int, seed: int, salt: str, start: int, count: int) -> list[int]:
    """Items ``start .. start+count`` of an endless stream of shuffled epochs over ``range(n)``.

    A pure function of its arguments: a resumed run draws the same images.
    """
    out = []
    for k in range(start, start + count):
        epoch, index = divmod(k, n)
        order = list(range(n))
        random.Random(f"{seed}:{salt}:{epoch}").shuffle(order)
        out.append(order[index])
    return out


def _train_step(models: Models, setup: Setup, optimizer, scheduler, scaler, texts: _TextConditioning,
                instance: _Latents, klass: _Latents | None, hp: Any, step: int,
                device: torch.device, autocast_dtype: torch.dtype | None) -> tuple[float, int]:
    """One optimizer step of ``gradient_accumulation_steps`` micro-batches; returns (loss, images used).

    A micro-batch is ``train_batch_size`` instance images (plus as many class images with prior
    preservation); images of different bucket shapes go through the UNet in one pass per shape and
    their per-image losses are averaged together, so the loss is the same as one pass would give.
    """
    from diffusers.training_utils import compute_snr

    batch, accumulation = hp.train_batch_size, hp.gradient_accumulation_steps
    noise_scheduler = models.noise_scheduler
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise InvalidRequestError(f"the base model's scheduler has prediction_type {prediction!r}; "
                                  "training supports 'epsilon', 'v_prediction' and 'sample'", param="model")
    scaling = models.vae.config.scaling_factor
    shift = getattr(models.vae.config, "shift_factor", None) or 0.0
    total, used = 0.0, 0
    for micro in range(accumulation):
        position = (step * accumulation + micro) * batch
        picks = _stream_positions(len(instance), hp.seed, "instance", position, batch)
        items = [(instance, i) for i in picks]
        prompt_ids = [texts.prompt_ids[i] for i in picks]
        if klass is not None:
            items += [(klass, i) for i in _stream_positions(len(klass), hp.seed, "class", position, batch)]
            prompt_ids += [texts.class_id] * batch
        generator = torch.Generator("cpu").manual_seed(_step_seed(hp.seed, step, micro))
        groups = _by_shape([tuple(source.mean[i].shape) for source, i in items])
        draws = []
        for group in groups:  # one shape: the same draws, in the same order, as one batched tensor
            shape = (len(group), *items[group[0]][0].mean[items[group[0]][1]].shape)
            draws.append((torch.randn(shape, generator=generator).to(device),
                          torch.randn(shape, generator=generator).to(device)))
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(items),),
                                  generator=generator).to(device)
        losses, order = [], []
        for group, (eps, noise) in zip(groups, draws, strict=True):
            mean = torch.stack([items[k][0].mean[items[k][1]] for k in group])
            std = torch.stack([items[k][0].std[items[k][1]] for k in group])
            t = timesteps[group]
            latents = ((mean + std * eps) - shift) * scaling
            noisy = noise_scheduler.add_noise(latents, noise, t)
            context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                       else nullcontext())
            with context:
                encoder_states, pooled = texts.embed([prompt_ids[k] for k in group])
                extra = {}
                if models.xl:
                    time_ids = torch.stack([items[k][0].time_ids[items[k][1]] for k in group])
                    extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
                pred = models.unet(noisy, t, encoder_states, return_dict=False, **extra)[0]
            if prediction == "epsilon":
                target = noise
            elif prediction == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, t)
            else:
                target = latents
            losses.append(F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)))
            order.extend(group)
        per_image = torch.cat(losses)
        if order != sorted(order):
            per_image = per_image[torch.tensor(order, device=per_image.device).argsort()]
        inst, prior = per_image[:batch], per_image[batch:]
        if hp.snr_gamma is not None:
            # Min-SNR weighting (arXiv:2303.09556), as train_text_to_image_lora.py computes it.
            snr = compute_snr(noise_scheduler, timesteps[:batch])
            weights = torch.minimum(snr, torch.full_like(snr, hp.snr_gamma))
            if prediction == "epsilon":
                weights = weights / snr
            elif prediction == "v_prediction":
                weights = weights / (snr + 1)
            inst = inst * weights
        loss = inst.mean()
        if klass is not None:
            loss = loss + hp.prior_loss_weight * prior.mean()
        loss = loss / accumulation
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
        used += len(items)
    params = list(setup.trainable.values())
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total, used


def _step_seed(seed: int, step: int, micro: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# --------------------------------------------------------------------------- checkpoints


def _fingerprint(data: ImageDataset, prompts: list[str]) -> str:
    digest = hashlib.sha256(data.sha256.encode())
    digest.update(json.dumps(prompts).encode())
    return digest.hexdigest()


def _checkpoint(recipe, models: Models, setup: Setup, optimizer, scheduler, scaler, state: _RunState,
                spec: ImageTrainingSpec, hp: Any, fingerprint: str, before_png: bytes) -> dict[str, Any]:
    return {
        "method": spec.method,
        "hyperparameters": hp.to_dict(),
        "data_fingerprint": fingerprint,
        "step": state.step,
        "losses": list(state.losses),
        "train_seconds": state.train_seconds,
        "before_metrics": dict(state.before or {}),
        "before_grid": before_png,
        "class_digest": state.class_digest,
        "trainable": kit.full_weights(setup.trainable),
        "payload": recipe.checkpoint_payload(models, setup),
        "optimizer": kit.full_optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": kit.capture_rng(),
    }


def _restore(setup: Setup, optimizer, scheduler, scaler, saved: dict, state: _RunState) -> None:
    kit.restore_weights(setup.trainable, saved["trainable"])
    kit.load_optimizer_state(optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    kit.restore_rng(saved["rng"])
    state.step = saved["step"]
    state.losses = list(saved["losses"])
    state.train_seconds = saved["train_seconds"]
