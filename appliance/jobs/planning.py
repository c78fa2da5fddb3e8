"""A new job's memory plan, made when it is created: a job that cannot fit is refused then, not an hour in.

The API process knows the model's shape (its ``config.json``) and the request's
settings, not yet the data: ``"auto"`` fields take the values the trainer would
give them at most (``max_seq_length``: 2048 or the model's context; the batch
its smallest share). The worker plans again once the data is tokenised and
its device's free memory is known (:func:`appliance.training.trainer._plan`),
and the job's ``compute.plan`` then shows that plan beside the measured peak.

Image jobs (:func:`image_plan_or_problem`) are planned once, here: the plan
chooses ``gradient_checkpointing`` and ``use_8bit_adam`` where they are
``"auto"``, and the worker trains with its choice (:func:`worker_image_hyperparameters`);
the measured peak is stored beside it as ``compute.measured``.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

from appliance.errors import InvalidRequestError
from appliance.modelstore.architectures import SUPPORTED_ARCHITECTURES
from appliance.training import planner
from appliance.training.hyperparameters import (
    AUTO_LORA_DROPOUT,
    AUTO_LORA_R,
    AUTO_MAX_SEQ_LENGTH_CAP,
    AUTO_MIN_BATCH_SIZE,
)
from appliance.training.memory import available_memory

AUTO = "auto"


@functools.lru_cache(maxsize=4)
def training_device(memory_gib: float = 0.0) -> planner.Device:
    """The device a training worker gets: ``memory_gib`` when the administrator set it, else detected (once).

    Detection asks ``nvidia-smi`` for the first GPU's total memory (a queued job has the card to
    itself when it runs; no torch in the API process) and falls back to the host's available
    memory (workers train on the CPU there).
    """
    if memory_gib > 0:
        return planner.Device("cuda", int(memory_gib * planner.GIB), "APPLIANCE_TRAINING_DEVICE_MEMORY_GIB")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            name, total_mib = out.strip().splitlines()[0].rsplit(",", 1)
            return planner.Device("cuda", int(float(total_mib)) << 20, name.strip())
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return planner.Device("cpu", available_memory(), "host memory")


def plan_at_creation(model_dir: str | Path, method: str, hyperparameters: dict[str, Any], compute: dict[str, Any],
                     device: planner.Device, *, max_workers: int) -> dict[str, Any]:
    """``compute.plan`` for a new job on ``device``.

    Raises:
        InvalidRequestError: Even the smallest plan does not fit; the message says
            what would (QLoRA, more workers with FSDP, a shorter ``max_seq_length``).
    """
    config = json.loads((Path(model_dir) / "config.json").read_text())
    shape = planner.ModelShape.from_config(config)
    hp = hyperparameters
    context = shape.max_position_embeddings or 2048
    max_seq_length = hp.get("max_seq_length", AUTO)
    if max_seq_length == AUTO:
        max_seq_length = min(AUTO_MAX_SEQ_LENGTH_CAP, context)
    architecture = SUPPORTED_ARCHITECTURES.get(config.get("model_type", ""))
    targets = hp.get("target_modules", AUTO)
    if targets == AUTO:
        targets = architecture.default_target_modules if architecture else planner.DEFAULT_TARGETS
    batch_size = hp.get("batch_size", AUTO)
    batch_size = AUTO_MIN_BATCH_SIZE if batch_size == AUTO else int(batch_size)  # the auto rule's smallest batch
    workers = int(compute.get("workers", 1))
    sharding = compute.get("sharding", AUTO)
    accumulation = hp.get("gradient_accumulation_steps", AUTO)
    checkpointing = hp.get("gradient_checkpointing", AUTO)
    precision = hp.get("precision", AUTO)
    if precision == AUTO:
        precision = "bf16" if device.kind == "cuda" else "fp32"
    job = planner.JobShape(
        method=method, targets=tuple(targets),
        rank=AUTO_LORA_R if hp.get("lora_r", AUTO) == AUTO else int(hp["lora_r"]),
        max_seq_length=int(max_seq_length), batch_size=batch_size, precision=precision,
        lora_dropout=(AUTO_LORA_DROPOUT if hp.get("lora_dropout", AUTO) == AUTO
                      else float(hp["lora_dropout"])),
        dp=hp.get("dp") is not None, workers=workers,
        fsdp=None if sharding == AUTO else sharding == "fsdp",
        checkpointing=None if checkpointing == AUTO else bool(checkpointing),
        micro_batch_examples=None if accumulation == AUTO else math.ceil(math.ceil(batch_size / workers)
                                                                          / int(accumulation)),
    )
    chosen = planner.plan(shape, job, device)
    if chosen is None:
        raise planner.refuse(shape, job, device, field=f"method.{method}.hyperparameters.max_seq_length",
                             max_workers=max(max_workers, 1))
    return {**chosen.to_dict(), "made": "at creation, before the data was tokenised",
            "assumed": {"max_seq_length": job.max_seq_length, "batch_size": batch_size}}


def plan_or_problem(model_dir: str | Path, method: str, hyperparameters: dict[str, Any], compute: dict[str, Any],
                    device: planner.Device, *, max_workers: int) -> dict[str, Any] | None:
    """:func:`plan_at_creation`, or ``None`` when the model's config cannot be planned (never blocks a job)."""
    try:
        return plan_at_creation(model_dir, method, hyperparameters, compute, device, max_workers=max_workers)
    except InvalidRequestError as exc:
        if exc.param == "model":  # a config the planner does not understand: the worker will tell
            return None
        raise
    except (OSError, ValueError, KeyError, TypeError):
        return None


def worker_sharding(compute: dict[str, Any] | None) -> str:
    """The ``sharding`` a worker trains with: the job's choice, or with ``auto`` the memory plan's.

    The plan made at creation (``compute.plan``) is what the job shows; the worker follows it, so
    what was shown is what runs. Without a plan (a model whose config could not be planned) the
    worker decides from the weights' size against its own device (``auto``).
    """
    compute = compute or {}
    sharding = compute.get("sharding", AUTO)
    planned = (compute.get("plan") or {}).get("sharding")
    if sharding == AUTO and planned in ("fsdp", "none"):
        return planned
    return sharding


def image_plan_at_creation(model_dir: str | Path, method: str, hyperparameters: dict[str, Any],
                           device: planner.Device, *, evaluator_params: int = 0) -> dict[str, Any]:
    """``compute.plan`` for a new image job on ``device``: its memory options and predicted peak
    (``evaluator_params``: the largest fidelity evaluator's parameters, on the device while it scores).

    Raises:
        InvalidRequestError: Even gradient checkpointing with 8-bit Adam does not fit; ``param`` names the
            first field whose change would (``train_text_encoder``, ``method.type``, ``train_batch_size``,
            ``resolution``...).
    """
    from appliance.diffusion import planner as image_planner
    from appliance.diffusion.hyperparameters import DEFAULTS

    shape = image_planner.ImageModelShape.from_model_dir(model_dir)
    hp = hyperparameters
    resolution = shape.default_resolution if hp.get("resolution", AUTO) == AUTO else int(hp["resolution"])
    batch = hp.get("train_batch_size", AUTO)
    batch = DEFAULTS[method]["train_batch_size"] if batch == AUTO else int(batch)
    precision = hp.get("mixed_precision", AUTO)
    if precision == AUTO:  # as resolve() on the worker, assuming a current GPU computes in bf16
        precision = "bf16" if device.kind == "cuda" else "no"
    rank = hp.get("rank", AUTO)

    def option(name: str) -> bool | None:
        value = hp.get(name, AUTO)
        return None if value == AUTO else bool(value)

    job = image_planner.ImageJobShape(
        method=method, resolution=resolution, train_batch_size=batch,
        prior_preservation=hp.get("class_prompt") is not None, mixed_precision=precision,
        train_text_encoder=bool(hp.get("train_text_encoder", False)),
        rank=DEFAULTS[method].get("rank", 4) if rank == AUTO else int(rank),
        gradient_checkpointing=option("gradient_checkpointing"), use_8bit_adam=option("use_8bit_adam"),
        evaluator_params=evaluator_params)
    chosen = image_planner.plan(shape, job, device)
    if chosen is None:
        raise image_planner.refuse(shape, job, device)
    return {**chosen.to_dict(), "made": "at creation", "mixed_precision": precision}


def image_plan_or_problem(model_dir: str | Path, method: str, hyperparameters: dict[str, Any],
                          device: planner.Device, *, evaluator_params: int = 0) -> dict[str, Any] | None:
    """:func:`image_plan_at_creation`, or ``None`` when the pipeline's configs cannot be planned (never blocks)."""
    try:
        return image_plan_at_creation(model_dir, method, hyperparameters, device, evaluator_params=evaluator_params)
    except InvalidRequestError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def worker_image_hyperparameters(hyperparameters: dict[str, Any], compute: dict[str, Any] | None) -> dict[str, Any]:
    """An image job's hyperparameters with ``"auto"`` memory options replaced by the plan's choice.

    Explicit ``true``/``false`` are the job's and stay; without a plan ``"auto"`` stays (and means off).
    """
    plan = (compute or {}).get("plan") or {}
    out = dict(hyperparameters)
    for name in ("gradient_checkpointing", "use_8bit_adam"):
        if out.get(name, AUTO) == AUTO and isinstance(plan.get(name), bool):
            out[name] = plan[name]
    return out


#: The methods a base model's card plans, by kind, in the order a person would try them.
CARD_METHODS = {"llm": ("lora", "qlora"), "diffusion": ("lora", "dreambooth_lora", "dreambooth")}


def starting_points(model_dir: str | Path, kind: str, device: planner.Device, *,
                    max_workers: int = 1) -> list[dict[str, Any]]:
    """What a job with every setting ``"auto"`` would need on ``device``, per method: the model card's
    memory column, and the job form's recommendation with its reasons.

    Each entry: ``method``, ``fits`` (``None`` when the config cannot be planned), the predicted peak
    and what the plan chose (checkpointing, sharding, 8-bit Adam), or the refusal's message naming
    what would fit.
    """
    out: list[dict[str, Any]] = []
    for method in CARD_METHODS.get(kind, ()):
        entry: dict[str, Any] = {"method": method}
        try:
            if kind == "llm":
                plan = plan_at_creation(model_dir, method, {}, {}, device, max_workers=max_workers)
                chosen = [f"{plan['micro_batch_tokens']:,} tokens a micro-batch"]
                if plan["activation_checkpointing"]:
                    chosen.append("activation checkpointing")
                if plan["sharding"] == "fsdp":
                    chosen.append("FSDP")
            else:
                plan = image_plan_at_creation(model_dir, method, {}, device)
                chosen = [f"{plan['resolution']} px"]
                chosen += [label for key, label in (("gradient_checkpointing", "gradient checkpointing"),
                                                    ("use_8bit_adam", "8-bit Adam")) if plan[key]]
            entry.update(fits=True, predicted_peak_gib=plan["predicted_peak_gib"], chosen=", ".join(chosen))
        except InvalidRequestError as exc:  # param "model": a config the planner does not understand
            entry.update(fits=None if exc.param == "model" else False, problem=exc.message)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            entry.update(fits=None, problem="its configuration cannot be planned")
        out.append(entry)
    return out


def recommendation(points: list[dict[str, Any]], kind: str) -> str | None:
    """The starting point the job form suggests, with its reason, from :func:`starting_points`."""
    fitting = [p for p in points if p.get("fits")]
    if not fitting:
        return None
    first = fitting[0]
    if kind == "llm":
        if first["method"] == "lora":
            return (f"Start with LoRA: it fits this appliance's training device ({first['predicted_peak_gib']} GiB "
                    f"predicted with {first['chosen']}) and trains faster than QLoRA, which is for models that do "
                    "not fit otherwise.")
        return (f"Start with QLoRA: LoRA does not fit this appliance's training device, QLoRA does "
                f"({first['predicted_peak_gib']} GiB predicted with {first['chosen']}).")
    if first["method"] == "lora":
        return (f"Start with LoRA (or DreamBooth+LoRA for one subject): {first['predicted_peak_gib']} GiB predicted "
                f"at {first['chosen']}; full DreamBooth changes the whole UNet and needs more memory.")
    labels = {"dreambooth_lora": "DreamBooth+LoRA", "dreambooth": "DreamBooth"}
    return (f"Start with {labels.get(first['method'], first['method'])}: {first['predicted_peak_gib']} GiB predicted "
            f"at {first['chosen']}; LoRA with its default settings does not fit (its line says what would).")
