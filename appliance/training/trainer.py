"""The training entry point: records in, adapter bytes out, nothing on disk.

:func:`train` tokenises the records, resolves ``"auto"`` hyperparameters,
asks the method's recipe for a model, measures validation loss, runs the
optimizer steps (packing each micro-batch, loss on target tokens only) with
events, checkpoints and cancellation, measures validation loss again and
returns the adapter as bytes. With ``dp`` set, the steps are DP-SGD instead
(:mod:`appliance.training.dp`: Poisson-sampled, padded, per-example clipped
and noised) and the result reports the privacy spent.

Offline by construction: every load passes ``local_files_only=True`` and the
base model is a local directory.

Process-wide effects, meant for a worker process that runs one job: glibc's
malloc cache is bounded (:mod:`appliance.training.memory`); the global RNG is
seeded inside ``torch.random.fork_rng`` and so left as the caller had it.

Run in a ``torch.distributed`` process group of several ranks (the Ray
executor's data-parallel workers), each rank trains on its share of every
batch and the gradients are summed (:mod:`appliance.training.distributed`):
the same steps, the same weights on every rank; rank 0 alone emits events and
checkpoints. Alone, a process trains exactly as before.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

from appliance.errors import InvalidRequestError
from appliance.modelstore.architectures import SUPPORTED_ARCHITECTURES
from appliance.trainkit import checkpoint as kit
from appliance.trainkit.checkpoint import CheckpointOpener
from appliance.trainkit.device import pick_device
from appliance.trainkit.errors import Cancelled, TrainingDivergedError, check_finite_loss, require_positive_int
from appliance.trainkit.events import ProgressWindow
from appliance.training import checkpoint as ckpt
from appliance.training import distributed, planner
from appliance.training.data import Example, fingerprint, split_validation, tokenize_records
from appliance.training.hyperparameters import AUTO, TrainingSpec, resolve
from appliance.training.memorization import (
    EXPOSURE_CANDIDATES,
    ProbeTarget,
    canary_exposure,
    canary_records,
    extraction_probe,
)
from appliance.training.memory import available_memory, bound_malloc_cache, measured_peak, peak_resident_reset
from appliance.training.packing import pack, packed_loss_sum
from appliance.training.protocol import Setup
from appliance.training.registry import get_recipe
from appliance.training.results import TrainingEvent, TrainMetrics, TrainResult

if TYPE_CHECKING:
    from appliance.training.dp import DpTraining  # imported at run time only for DP runs (opacus)

MAX_GRAD_NORM = 1.0
EVAL_TOKEN_BUDGET = 8192


def train(
    spec: TrainingSpec,
    model_dir: Path,
    train_records: Sequence[Mapping[str, Any]],
    val_records: Sequence[Mapping[str, Any]] | None = None,
    *,
    on_event: Callable[[TrainingEvent], None] | None = None,
    on_checkpoint: Callable[[int, bytes], None] | None = None,
    open_checkpoint: CheckpointOpener | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_from: bytes | None = None,
    device: str = "auto",
    base_model_name: str | None = None,
    event_every_steps: int = 10,
    canaries: Sequence[str] = (),
    canary_repetitions: int = 1,
    probe_targets: Sequence[ProbeTarget] = (),
    sharding: str = "auto",
    validate_every_epoch: bool = False,
) -> TrainResult:
    """Fine-tune an adapter on in-memory records.

    Args:
        spec: Method and hyperparameters (:meth:`TrainingSpec.from_method`).
        model_dir: An imported base model (:func:`appliance.modelstore.import_model`).
        train_records: Parsed training records (chat, prompt/completion or text).
        val_records: Parsed validation records; ``None`` holds out 10% of the
            training records (seeded by ``seed``).
        on_event: Called with a :class:`TrainingEvent` every ``event_every_steps``
            steps, at the last step, and after each validation pass.
        on_checkpoint: Called with ``(step, checkpoint_bytes)`` every
            ``checkpoint_every_steps`` steps (not at the last step: the result
            carries the final adapter). The checkpoint is whole in memory first.
        open_checkpoint: Instead of ``on_checkpoint``: called with the step, returns a context
            manager whose binary file the checkpoint is serialised into as it is written (the
            worker's stream to the control plane), so it is never whole in memory.
        should_stop: Polled before every step and evaluation batch; when it
            returns true the run stops and returns a ``cancelled`` result.
        resume_from: Bytes from ``on_checkpoint``; the run continues from there
            and ends with the same weights as an uninterrupted run (same spec,
            data and device required).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        base_model_name: Written as ``base_model_name_or_path`` in the adapter
            config; defaults to ``model_dir``'s name (never a local path).
        event_every_steps: Steps between ``train`` events.
        canaries: Canary sentences (:func:`~appliance.training.memorization.new_canaries`)
            added to the training examples (never to validation), each
            ``canary_repetitions`` times; their exposure is measured after training.
        canary_repetitions: How often each canary is inserted.
        probe_targets: Allowed scanner findings in ``train_records`` for the
            extraction probe run after training.
        sharding: With several data-parallel ranks, ``none`` replicates the
            base model on each, ``fsdp`` shards it over them (methods that
            support it), and ``auto`` shards when a copy per rank would not fit
            (:func:`~appliance.training.distributed.needs_sharding`). Ignored
            when training alone.
        validate_every_epoch: Also measure the validation loss at the end of every epoch but the last
            (a ``validation`` event each, ``epoch`` whole): a search trial's reports to its pruner.

    Returns:
        A :class:`TrainResult`.

    Raises:
        InvalidRequestError: Bad records, hyperparameters, device or checkpoint.
        TrainingDivergedError: The loss became non-finite.
    """
    model_dir = Path(model_dir)
    torch_device = pick_device(device)
    ddp, emit, stop, save_checkpoint = _join_data_parallel(
        spec, model_dir, torch_device, sharding, on_event or (lambda event: None), should_stop or (lambda: False),
        ckpt.CHECKPOINT.saver(on_checkpoint, open_checkpoint),
    )
    recipe = get_recipe(spec.method)
    require_positive_int("event_every_steps", event_every_steps)
    require_positive_int("canary_repetitions", canary_repetitions)
    resident_before = peak_resident_reset() if torch_device.type == "cpu" else None
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    hp, train_set, val_set, dropped, plan = _prepare_data(
        spec, model_dir, train_records, val_records, torch_device,
        extra_train_records=canary_records(canaries, canary_repetitions), ddp=ddp,
    )
    steps_per_epoch = math.ceil(len(train_set) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    data_fingerprint = fingerprint(train_set, val_set)
    resume = ckpt.load_resume(resume_from, spec.method, hp, data_fingerprint, total_steps)

    def event(kind: str, step: int, **fields: Any) -> None:
        emit(TrainingEvent(type=kind, step=step, total_steps=total_steps, epoch=step / steps_per_epoch, **fields))

    if dropped:
        event("warning", 0, message=f"{dropped} record(s) dropped: no target tokens within max_seq_length")
    event("info", 0, message=_plan_message(plan))

    bound_malloc_cache()
    # Seeded inside a fork so the caller's global RNG state is left untouched.
    cuda_devices = []
    if torch_device.type == "cuda":
        cuda_devices = [torch_device.index if torch_device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(hp.seed)
        run = _build(spec, hp, recipe, model_dir, torch_device, ddp, train_set, val_set, total_steps,
                     steps_per_epoch, data_fingerprint, base_model_name or model_dir.name, event, stop,
                     save_checkpoint)
        run.setup.details["memory"] = {"plan": plan.to_dict()}
        if resident_before is not None:  # loading's page-cache peak is host memory, not the plan's to predict
            peak_resident_reset()
        try:
            _start(run, resume)
            _train_steps(run, event_every_steps, validate_every_epoch)
            valid_after = _validate_after(run)
            samples = _samples(run, model_dir)
            evidence = _memorization(run.setup, model_dir, train_records, canaries, canary_repetitions,
                                     probe_targets, hp.seed, event, run.state.step, stop)
        except Cancelled:
            return _result(run, "cancelled", None, None, dropped)
        finally:
            if run.dp is not None:
                run.dp.close()
            run.setup.details["memory"].update(measured_peak(torch_device, resident_before))
        adapter = recipe.save(run.setup, run.base_model_name)  # every rank: gathering is collective
        if run.dp is not None:
            run.dp.verify(adapter)
    return _result(run, "succeeded", adapter, valid_after, dropped, evidence, samples)


@dataclass
class _Run:
    """Everything one training run works with, once the model is set up."""

    spec: TrainingSpec
    hp: Any
    recipe: Any
    setup: Setup
    ddp: distributed.DataParallel | None
    dp: DpTraining | None
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: list[Example]
    val_set: list[Example]
    total_steps: int
    steps_per_epoch: int
    data_fingerprint: str
    base_model_name: str
    event: Callable[..., None]
    stop: Callable[[], bool]
    save_checkpoint: Callable[[int, dict[str, Any]], None] | None  # (step, checkpoint dict)
    state: _RunState = field(default_factory=lambda: _RunState())

    def privacy(self) -> dict[str, Any]:
        return {"dp": self.dp.report()} if self.dp is not None else {}


def _join_data_parallel(
    spec: TrainingSpec,
    model_dir: Path,
    device: torch.device,
    sharding: str,
    emit: Callable[[TrainingEvent], None],
    stop: Callable[[], bool],
    save_checkpoint: Callable[[int, dict[str, Any]], None] | None,
) -> tuple[distributed.DataParallel | None, Callable[[TrainingEvent], None], Callable[[], bool],
           Callable[[int, dict[str, Any]], None] | None]:
    """The process group this rank trains in (``None``: alone), and the callbacks as this rank uses them.

    Every rank stops at the same step; rank 0 alone reports events and checkpoints.
    """
    ddp = distributed.current(device)
    if ddp is None:
        return None, emit, stop, save_checkpoint
    sharded = distributed.resolve_sharding(sharding, spec.method, model_dir, device, ddp.world)
    ddp = dataclasses.replace(ddp, sharded=sharded)
    stop = ddp.agreed(stop)
    if ddp.rank != 0:
        emit, save_checkpoint = (lambda event: None), None
    return ddp, emit, stop, save_checkpoint


def _build(
    spec: TrainingSpec,
    hp: Any,
    recipe: Any,
    model_dir: Path,
    device: torch.device,
    ddp: distributed.DataParallel | None,
    train_set: list[Example],
    val_set: list[Example],
    total_steps: int,
    steps_per_epoch: int,
    data_fingerprint: str,
    base_model_name: str,
    event: Callable[..., None],
    stop: Callable[[], bool],
    save_checkpoint: Callable[[int, dict[str, Any]], None] | None,
) -> _Run:
    """The recipe's model (sharded over the ranks when ``ddp`` says so), its optimizer, scheduler and DP engine."""
    if ddp is not None and ddp.sharded:
        units: list[int] = []
        # The recipe shards the model before loading its weights: each rank loads its shards only.
        setup = recipe.setup(model_dir, hp, device,
                             shard=lambda causal_lm: units.append(distributed.shard_model(causal_lm, ddp, device)))
        event("info", 0, message=f"base model sharded over {ddp.world} workers (FSDP, {sum(units)} layers)")
    else:
        setup = recipe.setup(model_dir, hp, device)
    setup.model.train()  # from_pretrained leaves the base model in eval mode (no dropout, no checkpointing)
    if ddp is not None:
        setup.details["data_parallel"] = {"workers": ddp.world, "sharding": "fsdp" if ddp.sharded else "none"}
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * hp.warmup_ratio), total_steps)
    dp: DpTraining | None = None
    if getattr(hp, "dp", None) is not None:
        from appliance.training.dp import DpTraining  # opacus loads only for DP runs

        if ddp is not None:
            raise InvalidRequestError(
                f"`dp` trains in one worker; got {ddp.world} data-parallel workers", param="compute.workers")

        dp = DpTraining(setup, optimizer, hp, n_train=len(train_set), total_steps=total_steps)
    return _Run(spec, hp, recipe, setup, ddp, dp, trainable, optimizer, scheduler, train_set, val_set, total_steps,
                steps_per_epoch, data_fingerprint, base_model_name, event, stop, save_checkpoint)


def _start(run: _Run, resume: dict[str, Any] | None) -> None:
    """Continue from ``resume``, or measure the validation loss before training."""
    if resume is not None:
        _restore(run, resume)
    if run.dp is not None:
        run.event("info", run.state.step, message=run.dp.message())
    if resume is None and run.val_set:
        run.state.valid_before = _evaluate(run.setup, run.val_set, run.stop)
        run.event("validation", 0, valid_loss=run.state.valid_before, message="validation loss before training")


def _train_steps(run: _Run, event_every_steps: int, validate_every_epoch: bool = False) -> None:
    """The optimizer steps left, with ``train`` events, checkpoints and, when asked, a validation pass at each
    epoch's end but the last (raises :class:`Cancelled` when stopped)."""
    state, hp = run.state, run.hp
    window = ProgressWindow()
    while state.step < run.total_steps:
        epoch, index = divmod(state.step, run.steps_per_epoch)
        batch = _next_batch(run, epoch, index)
        if run.stop():
            raise Cancelled
        if run.dp is not None:
            loss, tokens = run.dp.step(run.setup, batch, run.scheduler, lambda: _autocast(run.setup))
        else:
            loss, tokens = _train_step(run.setup, run.optimizer, run.scheduler, run.trainable, batch, hp, run.ddp)
        check_finite_loss(loss, state.step, hp.learning_rate, f"method.{run.spec.method}.hyperparameters.learning_rate")
        state.step += 1
        state.train_seconds = window.elapsed()
        state.trained_tokens += tokens
        state.session_tokens += tokens
        if index == 0:
            state.epoch_losses = []
        if loss is not None:  # None: an empty Poisson batch (DP), noise only
            state.epoch_losses.append(loss)
        window.add(loss, tokens)

        last = state.step == run.total_steps
        if state.step % event_every_steps == 0 or last:
            train_loss, tokens_per_second = window.flush()
            run.event("train", state.step, train_loss=train_loss, learning_rate=run.scheduler.get_last_lr()[0],
                      tokens_per_second=tokens_per_second, trained_tokens=state.trained_tokens)
        if validate_every_epoch and run.val_set and state.step % run.steps_per_epoch == 0 and not last:
            with window.paused():  # evaluating is not training time; it draws no random numbers
                valid_loss = _evaluate(run.setup, run.val_set, run.stop)
            run.event("validation", state.step, valid_loss=valid_loss, trained_tokens=state.trained_tokens,
                      message=f"validation loss after epoch {state.step // run.steps_per_epoch}")
        every = hp.checkpoint_every_steps
        # Sharded, every rank takes part in gathering the weights; rank 0 keeps them.
        gathering = run.save_checkpoint or (run.ddp is not None and run.ddp.sharded)
        if gathering and every and state.step % every == 0 and not last:
            with window.paused():  # checkpointing is not training time
                saved = _checkpoint(run)
                if run.save_checkpoint:
                    run.save_checkpoint(state.step, saved)
                del saved


def _next_batch(run: _Run, epoch: int, index: int) -> list[Example]:
    """The examples of the next step: Poisson-sampled under DP, else the epoch's seeded order."""
    if run.dp is not None:
        return [run.train_set[i] for i in run.dp.sample()]
    size = run.hp.batch_size
    order = _epoch_order(len(run.train_set), run.hp.seed, epoch)
    return [run.train_set[i] for i in order[index * size : (index + 1) * size]]


def _validate_after(run: _Run) -> float | None:
    """The validation loss after training (``None`` without validation data)."""
    if not run.val_set:
        return None
    valid_after = _evaluate(run.setup, run.val_set, run.stop, on_progress=_phase_progress(
        "validation after training", "example", run.event, run.state.step, run.stop, time.monotonic(), quiet_when_quick=True))
    run.event("validation", run.state.step, valid_loss=valid_after, trained_tokens=run.state.trained_tokens,
              message="validation loss after training")
    return valid_after


def _samples(run: _Run, model_dir: Path) -> list[dict[str, str]]:
    """A few validation prompts answered before and after training (:mod:`appliance.training.samples`).

    One worker only: with several, generating is a collective step under FSDP and would be repeated by
    every rank otherwise; the event says why there are none.
    """
    from transformers import AutoTokenizer

    from appliance.training.samples import sample_generations

    if not run.val_set:
        return []
    if run.ddp is not None:
        run.event("info", run.state.step, message="sample generations: not made in multi-worker jobs")
        return []
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    samples = sample_generations(run.setup.model, tokenizer, run.val_set, run.setup.device, stop=run.stop)
    if samples:  # none when the validation records have no prompt before their target (plain text records)
        run.event("info", run.state.step, message=f"sample generations: {len(samples)} validation prompt(s) "
                  f"answered before and after training, greedily ({time.monotonic() - started:.1f} s; a result file)")
    return samples


def _result(
    run: _Run,
    status: str,
    adapter: dict[str, bytes] | None,
    valid_after: float | None,
    dropped: int,
    evidence: dict[str, Any] | None = None,
    samples: list[dict[str, str]] | None = None,
) -> TrainResult:
    return TrainResult(
        status=status,
        adapter=adapter,
        hyperparameters=run.hp,
        metrics=_metrics(run.state, valid_after, run.total_steps, run.train_set, run.val_set, dropped),
        details=run.setup.details,
        privacy={**run.privacy(), **(evidence or {})},
        samples=list(samples or []),
    )


def _memorization(
    setup: Setup,
    model_dir: Path,
    train_records: Sequence[Mapping[str, Any]],
    canaries: Sequence[str],
    repetitions: int,
    probe_targets: Sequence[ProbeTarget],
    seed: int,
    event: Callable[..., None],
    step: int,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Canary exposure and the extraction probe on the trained model (see :mod:`appliance.training.memorization`),
    each announced with its size, with progress and time left as it goes, and its duration at the end."""
    if not canaries and not probe_targets:
        return {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    out: dict[str, Any] = {}
    with _autocast(setup):
        if canaries:
            event("info", step, message=f"measuring canary exposure: {len(canaries)} canaries, each against "
                  f"{EXPOSURE_CANDIDATES} random secrets, with and without the adapter")
            started = time.monotonic()
            out["canaries"] = canary_exposure(setup.model, tokenizer, canaries, setup.device, seed=seed,
                                              on_progress=_phase_progress("canary exposure", "canary", event, step,
                                                                          stop, started)) | {
                "repetitions": repetitions, "seconds": round(time.monotonic() - started, 1)}
            event("validation", step, message=f"canary exposure {out['canaries']['mean_exposure']:.1f} bits "
                  f"(base model {out['canaries']['mean_exposure_base']:.1f}; measured in "
                  f"{out['canaries']['seconds']:.0f} s)")
        if probe_targets:
            event("info", step, message=f"extraction probe: prompting with the context of {len(probe_targets)} "
                  "allowed value(s)")
            started = time.monotonic()
            out["extraction"] = extraction_probe(setup.model, tokenizer, train_records, probe_targets, setup.device,
                                                 on_progress=_phase_progress("extraction probe", "value", event,
                                                                             step, stop, started))
            found = out["extraction"]
            event("validation", step, message=f"extraction probe: {found['extracted']} of {found['probed']} "
                  f"allowed values completed from their context ({time.monotonic() - started:.0f} s)")
    return out


#: Post-training phases report progress at most this often (seconds), and at the end of each item.
PHASE_EVENT_SECONDS = 10.0


def _phase_progress(phase: str, item: str, event: Callable[..., None], step: int, stop: Callable[[], bool],
                    started: float, *, quiet_when_quick: bool = False) -> Callable[[int, int], None]:
    """A progress callback for a post-training phase: an event with the time left, every
    :data:`PHASE_EVENT_SECONDS` at most; stops the phase when the job is cancelled.

    ``quiet_when_quick``: a phase that ends within :data:`PHASE_EVENT_SECONDS` says nothing (the validation
    pass, whose result is its own event); otherwise the end is always reported."""
    last = [started]
    reported = [not quiet_when_quick]

    def report(done: int, total: int) -> None:
        if stop():
            raise Cancelled
        now = time.monotonic()
        if done < total and now - last[0] < PHASE_EVENT_SECONDS:
            return
        if done >= total and not reported[0]:
            return
        last[0], reported[0] = now, True
        elapsed = now - started
        left = elapsed / done * (total - done) if done else 0.0
        event("info", step, message=f"{phase}: {item} {done} of {total} ({elapsed:.0f} s"
              + (f", about {left:.0f} s left)" if done < total else ")"),
              phase={"name": phase, "done": done, "total": total, "seconds_left": round(left)})

    return report


def _prepare_data(
    spec: TrainingSpec,
    model_dir: Path,
    train_records: Sequence[Mapping[str, Any]],
    val_records: Sequence[Mapping[str, Any]] | None,
    device: torch.device,
    *,
    extra_train_records: Sequence[Mapping[str, Any]] = (),
    ddp: distributed.DataParallel | None = None,
) -> tuple[Any, list[Example], list[Example], int, planner.Plan]:
    """Tokenise, split, plan memory, resolve ``"auto"`` and truncate.

    Returns:
        Resolved hyperparameters, training and validation examples, how many
        records were dropped for having no target tokens left after truncation,
        and the memory plan the micro-batches and checkpointing follow.

    Raises:
        InvalidRequestError: Among others, the job does not fit the device
            whatever the plan (before any weight is loaded).
    """
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architecture = SUPPORTED_ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise InvalidRequestError(
            f"`model_dir` {model_dir.name} has architecture {config.model_type!r}, which cannot be trained; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
            param="model",
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    train_set = tokenize_records(train_records, tokenizer, param="train_records")
    if val_records is None:
        train_set, val_set = split_validation(train_set, spec.hyperparameters.seed)
    else:
        val_set = tokenize_records(val_records, tokenizer, param="val_records")
    if extra_train_records:  # after the split: canaries are training data only
        train_set = train_set + tokenize_records(extra_train_records, tokenizer, param="canaries")

    facts = dict(
        n_train_examples=len(train_set),
        longest_example_tokens=max(len(e) for e in train_set),
        context_length=getattr(config, "max_position_embeddings", None),
        default_target_modules=architecture.default_target_modules,
        device_type=device.type,
        bf16_supported=device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    plan = _plan(spec, resolve(spec.hyperparameters, **facts), config.to_dict(), device, ddp)
    workers = ddp.world if ddp is not None else 1  # resolve() counts micro-batches of the whole step
    hp = resolve(spec.hyperparameters, **facts, micro_batch_examples=plan.examples_per_micro_batch * workers,
                 checkpointing=plan.checkpointing)
    n_records = len(train_set) + len(val_set)
    train_set = [e for e in (x.truncated(hp.max_seq_length) for x in train_set) if e.n_targets > 0]
    val_set = [e for e in (x.truncated(hp.max_seq_length) for x in val_set) if e.n_targets > 0]
    dropped = n_records - len(train_set) - len(val_set)
    if not train_set:
        raise InvalidRequestError(
            f"no training record has target tokens within max_seq_length={hp.max_seq_length}; "
            "raise `max_seq_length` or shorten the prompts",
            param=f"method.{spec.method}.hyperparameters.max_seq_length",
        )
    return hp, train_set, val_set, dropped, plan


def _plan(spec: TrainingSpec, hp: Any, config: dict[str, Any], device: torch.device,
          ddp: distributed.DataParallel | None) -> planner.Plan:
    """The memory plan for ``hp`` (resolved once without it) on this rank's device; refused if none fits."""
    given = spec.hyperparameters
    workers = ddp.world if ddp is not None else 1
    per_rank = math.ceil(hp.batch_size / workers)
    checkpointing = getattr(given, "gradient_checkpointing", AUTO)
    job = planner.JobShape(
        method=spec.method, rank=hp.lora_r, targets=tuple(hp.target_modules), max_seq_length=hp.max_seq_length,
        batch_size=hp.batch_size, precision=getattr(hp, "precision", "fp32"), lora_dropout=hp.lora_dropout,
        dp=getattr(hp, "dp", None) is not None, workers=workers, fsdp=bool(ddp is not None and ddp.sharded),
        checkpointing=None if checkpointing == AUTO else bool(checkpointing),
        micro_batch_examples=(None if given.gradient_accumulation_steps == AUTO
                              else math.ceil(per_rank / given.gradient_accumulation_steps)),
    )
    shape = planner.ModelShape.from_config(config)
    target = plan_device(device, ranks_here=workers if device.type == "cpu" else 1)
    chosen = planner.plan(shape, job, target)
    if chosen is None:
        raise planner.refuse(shape, job, target, field=f"method.{spec.method}.hyperparameters.max_seq_length")
    return chosen


def plan_device(device: torch.device, ranks_here: int = 1) -> planner.Device:
    """What one rank may use: a GPU's free memory, or the host's available memory shared by its ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return planner.Device("cuda", int(free), torch.cuda.get_device_name(device))
    return planner.Device("cpu", available_memory() // max(1, ranks_here), "host memory")


def _plan_message(plan: planner.Plan) -> str:
    return (f"memory plan: predicted peak {plan.estimate.total / planner.GIB:.2f} GiB of "
            f"{plan.device.budget / planner.GIB:.1f} GiB usable on {plan.device.kind}; micro-batches of up to "
            f"{plan.micro_batch_tokens} tokens ({plan.gradient_accumulation_steps} per step), activation "
            f"checkpointing {'on' if plan.checkpointing else 'off'}, sharding {'fsdp' if plan.fsdp else 'none'}")


@dataclass
class _RunState:
    """Counters that a checkpoint carries across a resume."""

    step: int = 0
    trained_tokens: int = 0
    session_tokens: int = 0  # this call only, for tokens/s
    train_seconds: float = 0.0
    epoch_losses: list[float] = field(default_factory=list)
    valid_before: float | None = None


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resumes need no saved order."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def _autocast(setup: Setup):
    if setup.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(setup.device.type, dtype=setup.autocast_dtype)


def _train_step(
    setup: Setup,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainable: list[torch.nn.Parameter],
    examples: list[Example],
    hp: Any,
    ddp: distributed.DataParallel | None = None,
) -> tuple[float, int]:
    """One optimizer step over ``examples``, split into ``gradient_accumulation_steps`` packed micro-batches.

    The loss is the mean over every target token of the step, however it is
    split, so accumulation does not change the maths; nor does data
    parallelism (``ddp``): a rank runs its share and the gradients are summed.
    """
    causal_lm = setup.model.get_base_model()
    n_targets = sum(e.n_targets for e in examples)
    if ddp is None:
        chunks = distributed.micro_batches(examples, hp.gradient_accumulation_steps)
    else:
        chunks = ddp.micro_batches(examples, hp.gradient_accumulation_steps)
    loss_total = 0.0
    for chunk in chunks:
        # An empty micro-batch (sharded ranks run as many forwards as the busiest one) adds nothing.
        batch = pack(chunk or examples[:1]).to(setup.device)
        with _autocast(setup):
            loss = packed_loss_sum(causal_lm, batch)
            loss = loss / n_targets if chunk else loss * 0.0
        (loss * ddp.gradient_scale if ddp is not None and ddp.sharded else loss).backward()
        loss_total += loss.item()
    if ddp is not None:
        if not ddp.sharded:  # FSDP has reduce-scattered (summed) the gradients in backward
            ddp.sum_gradients(trainable)
        loss_total = ddp.sum(loss_total)
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, sum(len(e) for e in examples)


def _evaluate(setup: Setup, examples: list[Example], stop: Callable[[], bool],
              on_progress: Callable[[int, int], None] | None = None) -> float:
    """Mean loss per target token over ``examples``, packed into rows of about EVAL_TOKEN_BUDGET tokens;
    ``on_progress(done, total)`` after each row."""
    causal_lm = setup.model.get_base_model()
    total, count = 0.0, 0
    setup.model.eval()
    try:
        with torch.no_grad():
            start = 0
            while start < len(examples):
                if stop():
                    raise Cancelled
                end, tokens = start + 1, len(examples[start])
                while end < len(examples) and tokens + len(examples[end]) <= EVAL_TOKEN_BUDGET:
                    tokens += len(examples[end])
                    end += 1
                batch = pack(examples[start:end]).to(setup.device)
                with _autocast(setup):
                    total += packed_loss_sum(causal_lm, batch).item()
                count += batch.n_targets
                start = end
                if on_progress is not None:
                    on_progress(start, len(examples))
    finally:
        setup.model.train()
    return total / count


def _metrics(
    state: _RunState,
    valid_after: float | None,
    total_steps: int,
    train_set: list[Example],
    val_set: list[Example],
    dropped: int,
) -> TrainMetrics:
    def ppl(loss: float | None) -> float | None:
        return None if loss is None else math.exp(min(loss, 700.0))

    return TrainMetrics(
        valid_loss_before=state.valid_before,
        valid_perplexity_before=ppl(state.valid_before),
        valid_loss_after=valid_after,
        valid_perplexity_after=ppl(valid_after),
        train_loss=(sum(state.epoch_losses) / len(state.epoch_losses)) if state.epoch_losses else None,
        steps=state.step,
        total_steps=total_steps,
        trained_tokens=state.trained_tokens,
        train_seconds=state.train_seconds,
        tokens_per_second=state.session_tokens / state.train_seconds if state.train_seconds > 0 else 0.0,
        n_train_examples=len(train_set),
        n_valid_examples=len(val_set),
        dropped_examples=dropped,
    )


def _checkpoint(run: _Run) -> dict[str, Any]:
    setup, state, dp = run.setup, run.state, run.dp
    # Whole tensors: when sharded, every rank gathers them (collectives), and rank 0 keeps them.
    trainable = kit.full_weights({n: p for n, p in setup.model.named_parameters() if p.requires_grad})
    adapter = run.recipe.save(setup, run.base_model_name)
    return {
        **({"dp": dp.state()} if dp is not None else {}),
        "method": run.spec.method,
        "hyperparameters": run.hp.to_dict(),
        "data_fingerprint": run.data_fingerprint,
        "step": state.step,
        "trained_tokens": state.trained_tokens,
        "epoch_losses": list(state.epoch_losses),
        "valid_before": state.valid_before,
        "trainable": trainable,
        "adapter": adapter,
        "optimizer": kit.full_optimizer_state(run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "rng": kit.capture_rng(),
    }


def _restore(run: _Run, saved: dict[str, Any]) -> None:
    state = run.state
    kit.restore_weights({n: p for n, p in run.setup.model.named_parameters() if p.requires_grad}, saved["trainable"])
    kit.load_optimizer_state(run.optimizer, saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    kit.restore_rng(saved["rng"])
    state.step = saved["step"]
    state.trained_tokens = saved["trained_tokens"]
    state.epoch_losses = list(saved["epoch_losses"])
    state.valid_before = saved["valid_before"]
    if run.dp is not None:
        run.dp.restore(saved.get("dp"), state.step)
