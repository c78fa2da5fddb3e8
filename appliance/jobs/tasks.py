"""What a worker runs for each kind of job (inside the sandbox)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.jobs.channel import Channel


def run_task(channel: Channel, start: dict[str, Any], datasets: dict[str, Any], resume: bytes | None) -> None:
    """Train the job's adapter (LLM or image model) and report everything over ``channel``."""
    if start.get("model_kind") == "diffusion":
        return run_image_task(channel, start, datasets, resume)
    from appliance.jobs.planning import worker_sharding
    from appliance.training import TrainingSpec, train
    from appliance.training.memorization import ProbeTarget

    method = {"type": start["method_type"], start["method_type"]: {"hyperparameters": start["hyperparameters"]}}
    spec = TrainingSpec.from_method(method)
    if resume is not None:
        channel.event(f"Resuming from the checkpoint at step {start.get('resume_step')}", type="message")
    channel.event(f"Training {spec.method} on {len(datasets['train'])} records"
                  + (f", validating on {len(datasets['validation'])}" if "validation" in datasets else
                     " (10% held out for validation)") + _data_parallel_note())

    def on_event(event) -> None:
        data = {k: v for k, v in event.to_dict().items() if v is not None and k != "message"}
        level = "warn" if event.type == "warning" else "info"
        # A post-training phase's progress is a metrics event too: the job lists read progress from those.
        channel.event(_progress_message(event), level=level,
                      type="metrics" if event.type in ("train", "validation") or event.phase else "message",
                      data=data)

    def open_checkpoint(step: int) -> contextlib.AbstractContextManager[Any]:
        # The trainer serialises the checkpoint into the stream as it goes: never whole in memory.
        return channel.artefact_writer({"kind": "checkpoint", "step": step, "metrics": {}})

    memorization = start.get("memorization") or {}
    canaries = memorization.get("canary_texts") or []
    probe_targets = [ProbeTarget.from_list(row) for row in memorization.get("probe_targets") or []]
    if canaries:
        channel.event(f"Inserting {len(canaries)} canaries x {memorization['canary_repetitions']} into the training "
                      "data to measure their exposure after training")
    result = train(
        spec, Path(start["model_dir"]), datasets["train"], datasets.get("validation"),
        on_event=on_event, open_checkpoint=open_checkpoint, should_stop=channel.stop.is_set,
        resume_from=resume, base_model_name=Path(start["model_dir"]).name,
        canaries=canaries, canary_repetitions=memorization.get("canary_repetitions", 1), probe_targets=probe_targets,
        sharding=worker_sharding(start.get("compute")), validate_every_epoch=bool(start.get("validate_every_epoch")),
    )
    if result.status == "cancelled":
        channel.send({"type": "cancelled", "step": result.metrics.steps})
        return
    if result.samples:  # validation text: an encrypted result file, never an event or a job field
        import json

        from appliance.training.samples import FILENAME, FORMAT

        channel.send_artefact({"kind": "result_file", "name": FILENAME},
                              json.dumps({"format": FORMAT, "samples": result.samples}, ensure_ascii=False).encode())
    for name, data in sorted(result.adapter.items()):
        channel.send_artefact({"kind": "artifact", "name": name}, data)
    channel.send({
        "type": "result", "metrics": result.metrics.to_dict(), "trained_tokens": result.metrics.trained_tokens,
        "resolved": result.hyperparameters.to_dict(), "details": result.details, "privacy": _with_probe_outcome(result.privacy, memorization, probe_targets),
    })


def _progress_message(event: Any) -> str:
    """An event's line for people: the step with its loss, or the trainer's message with the number it is about."""
    if event.type == "train":
        loss = f": training loss {event.train_loss:.4f}" if event.train_loss is not None else ""
        return f"Step {event.step}/{event.total_steps}{loss}"
    if event.type == "validation" and event.valid_loss is not None:
        return f"{event.message or f'Step {event.step}/{event.total_steps}: validation loss'} {event.valid_loss:.4f}"
    return event.message or f"Step {event.step}/{event.total_steps}"


def _data_parallel_note() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f", with {dist.get_world_size()} data-parallel workers ({dist.get_backend()})"
    return ""


def run_image_task(channel: Channel, start: dict[str, Any], datasets: dict[str, bytes], resume: bytes | None) -> None:
    """Stable Diffusion LoRA / DreamBooth / DreamBooth+LoRA; images become the job's result files."""
    from appliance.diffusion import ImageTrainingSpec, train_images
    from appliance.jobs.planning import worker_image_hyperparameters

    # "auto" memory options become the plan's choice (compute.plan, made at creation): what was shown runs
    hyperparameters = worker_image_hyperparameters(start["hyperparameters"], start.get("compute"))
    method = {"type": start["method_type"], start["method_type"]: {"hyperparameters": hyperparameters}}
    spec = ImageTrainingSpec.from_method(method)
    if resume is not None:
        channel.event(f"Resuming from the checkpoint at step {start.get('resume_step')}")
    channel.event(f"Training {spec.method} on the image dataset"
                  + (", with the uploaded class images" if "class" in datasets else ""))
    evaluators = start.get("evaluators") or {}
    if evaluators:
        channel.event("Fidelity is measured with the evaluator model(s) "
                      + ", ".join(f"{e['name']} ({family})" for family, e in sorted(evaluators.items()))
                      + ": CLIP-I/CLIP-T need a CLIP model, DINO a DINO ViT")
    else:
        channel.event("No evaluator model is imported: fidelity is reported as the colour proxy only")

    def on_event(event) -> None:
        data = {k: v for k, v in event.to_dict().items() if v is not None and k not in ("message", "images")}
        level = "warn" if event.type == "warning" else "info"
        channel.event(_progress_message(event), level=level,
                      type="metrics" if event.type == "train" else "message", data=data)
        for name, png in sorted((event.images or {}).items()):
            channel.send_artefact({"kind": "result_file", "name": name}, png)

    def open_checkpoint(step: int) -> contextlib.AbstractContextManager[Any]:
        return channel.artefact_writer({"kind": "checkpoint", "step": step, "metrics": {}})

    result = train_images(spec, Path(start["model_dir"]), datasets["train"], class_dataset=datasets.get("class"),
                          on_event=on_event,
                          open_checkpoint=open_checkpoint, should_stop=channel.stop.is_set, resume_from=resume,
                          clip_model=Path(evaluators["clip"]["path"]) if "clip" in evaluators else None,
                          dino_model=Path(evaluators["dino"]["path"]) if "dino" in evaluators else None)
    if result.status == "cancelled":
        channel.send({"type": "cancelled", "step": result.metrics.steps})
        return
    for name, data in sorted(result.images.items()):
        channel.send_artefact({"kind": "result_file", "name": name}, data)
    for name, data in sorted(result.artifacts.items()):
        channel.send_artefact({"kind": "artifact", "name": name}, data)
    channel.send({"type": "result", "metrics": result.metrics.to_dict(), "trained_tokens": None,
                  "resolved": result.hyperparameters.to_dict(), "details": result.details})


def _with_probe_outcome(privacy: dict[str, Any], memorization: dict[str, Any], targets: list[Any]) -> dict[str, Any]:
    """The privacy evidence, saying why the extraction probe did not run when it was asked for and did not."""
    if not memorization.get("extraction_probe") or "extraction" in privacy:
        return privacy
    reason = ("the policy allowed no personal data values in the training file, so there was nothing to probe for"
              if not targets else "it did not complete")
    return {**privacy, "extraction": {"probed": 0, "extracted": 0, "skipped": 0, "by_entity_type": {},
                                      "not_run": reason}}
