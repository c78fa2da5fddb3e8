"""What an evaluation worker runs for image models: each model's images for the test file's prompts.

The test file holds one prompt per record, ``{"text": "<prompt>"}`` (the field image datasets' captions
take in their ``metadata.jsonl``, and one of the shapes test files are scanned in); a chat or
prompt/completion record is refused naming it. The base pipeline is loaded once into the image engine
the playground serves with (:class:`serving.diffusers_engine.DiffusersEngine`), each fine-tune (its LoRA
or DreamBooth files streamed in by the runner, decrypted in memory) is loaded into it by name, and every
model generates ``images_per_prompt`` images per prompt with the same seeds (image k of prompt j:
``seed + j * images_per_prompt + k``), so the models differ only by their weights.

With a CLIP evaluator imported, each model's CLIP-T is measured as image jobs measure it
(:meth:`appliance.diffusion.evaluation.Evaluators.clip_t`): the mean cosine similarity of each prompt's
CLIP text embedding with the CLIP image embeddings of the images generated from it, over every prompt of
the file. Without one the figure is absent and the result says why. CLIP-I and DINO are not measured:
they compare with a subject's real images, which a test file of prompts does not hold (the image job
measures them against its instance images before and after training).

Figures go back in the result frame (no prompt, no image); the images of the first ``samples`` prompts
go back as one encrypted result file, never in an event or a log.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

from appliance.catalog.archive import unpack_files
from appliance.errors import InvalidFieldsError, InvalidRequestError
from appliance.evaluations.task import FILENAME, Reporter
from appliance.jobs.channel import Channel

#: The result file's format (``samples[].images`` holds base64 images per model: PNG, or JPEG above
#: :data:`KEPT_PNG_SIDE` px).
FORMAT = "appliance.image-evaluation/1"
KEPT_PNG_SIDE = 512
#: The name the base model goes by inside the engine (fine-tunes are ``a0`` ... ``a3``).
BASE = "base"
#: The largest LoRA rank image jobs train (``rank`` 1-256).
MAX_LORA_RANK = 256
#: (prompt, image) pairs embedded per CLIP-T pass: bounds the images held while a model runs.
CLIP_T_CHUNK = 64
#: Bad records reported by name before "and N more".
MAX_REPORTED = 5
#: Longest prompt (the image engine's limit on a request's prompt, as the playground serves it).
MAX_PROMPT_CHARS = 4000
NO_CLIP = ("not measured: no CLIP evaluator model is imported; an admin imports one (a transformers CLIPModel "
           "folder) to get CLIP-T")
CLIP_T_METRIC = ("CLIP-T: the mean cosine similarity of each prompt's CLIP text embedding with the CLIP image "
                 "embeddings of the images generated from it, over every prompt of the test file (as image jobs "
                 "measure it); same seeds for every model. CLIP-I and DINO need a subject's real images, which a "
                 "test file of prompts does not hold: they are not measured here")


def image_prompts(records: list[Any]) -> list[str]:
    """The prompt of each record (``{"text": ...}``); every bad record named at once (``file[i]``, 0-based).

    Raises:
        InvalidFieldsError: A record of another shape or an empty prompt (the messages quote no text).
    """
    prompts, problems = [], []
    for i, record in enumerate(records):
        where = f"file[{i}]"
        if isinstance(record, dict) and "messages" in record:
            problems.append((f"{where}.messages", f"record {i + 1} is a chat record; an image test file holds one "
                                                  'prompt per line as {"text": "<prompt>"}'))
        elif isinstance(record, dict) and "prompt" in record:
            problems.append((f"{where}.prompt", f"record {i + 1} is a prompt/completion record; an image test file "
                                                'holds one prompt per line as {"text": "<prompt>"}'))
        elif not isinstance(record, dict) or not isinstance(record.get("text"), str):
            problems.append((where, f'record {i + 1} must be {{"text": "<prompt>"}}'))
        elif not record["text"].strip():
            problems.append((f"{where}.text", f"record {i + 1} has an empty `text`: give the prompt"))
        elif len(record["text"]) > MAX_PROMPT_CHARS:
            problems.append((f"{where}.text", f"record {i + 1} has a prompt of {len(record['text'])} characters; "
                                              f"at most {MAX_PROMPT_CHARS}"))
        else:
            prompts.append(record["text"])
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = problems[:MAX_REPORTED]
        if more > 0:
            shown[-1] = (shown[-1][0], f"{shown[-1][1]}; and {more} more")
        raise InvalidFieldsError(shown)
    if not prompts:
        raise InvalidRequestError("the test file holds no prompts", param="file")
    return prompts


def run_image_evaluation(channel: Channel, start: dict[str, Any], records: list[dict[str, Any]],
                         adapters: bytes) -> None:
    """Generate each of ``start["models"]``' images for ``records``' prompts, score them and report over ``channel``."""
    from appliance.trainkit.errors import Cancelled

    prompts = image_prompts(records)
    settings = start["images"]
    engine = _engine(Path(start["model_dir"]), settings, unpack_files(adapters) if adapters else {}, start["models"])
    clip, fidelity = _clip(channel, start.get("evaluators") or {}, engine.device)
    n_models = len(start["models"])
    channel.event(f"Evaluating {n_models} image model(s) on {len(prompts)} prompts, {settings['images_per_prompt']} "
                  f"image(s) each with {settings['num_inference_steps']} steps, seed {settings['seed']}",
                  data={"models": n_models, "prompts": len(prompts), **settings})
    kept = min(start["samples"], len(prompts))
    results, images = [], []
    try:
        for i, entry in enumerate(start["models"]):
            began = time.monotonic()
            figures, pngs = _generate(engine, entry.get("adapter") or BASE, prompts, settings, kept, clip,
                                      stop=channel.stop.is_set, progress=Reporter(channel, i, n_models))
            results.append({"model": entry["id"], **figures})
            images.append(pngs)
            channel.event(f"Model {i + 1}/{n_models} evaluated in {time.monotonic() - began:.1f} s", type="metrics",
                          data=results[-1])
    except Cancelled:
        channel.send({"type": "cancelled"})
        return
    finally:
        engine.close()
    if kept:
        per = settings["images_per_prompt"]
        samples = [{"prompt": prompts[j], "seeds": [settings["seed"] + j * per + k for k in range(per)],
                    "images": {entry["id"]: [base64.b64encode(png).decode() for png in images[i][j]]
                               for i, entry in enumerate(start["models"])}}
                   for j in range(kept)]
        channel.send_artefact({"kind": "result_file", "name": FILENAME}, json.dumps(
            {"format": FORMAT, "models": [e["id"] for e in start["models"]], "results": results,
             "fidelity": fidelity, "settings": settings, "samples": samples}, ensure_ascii=False).encode())
    channel.send({"type": "result", "results": results, "fidelity": fidelity})


def _engine(model_dir: Path, settings: dict[str, int], files: dict[str, bytes], entries: list[dict[str, Any]]):
    """The base pipeline in the image engine with each entry's fine-tune (files under ``<adapter>/``) loaded by name."""
    from serving.diffusers_engine import DiffusersEngine, DiffusersEngineConfig
    from serving.errors import ServingError

    config = DiffusersEngineConfig(max_resident_adapters=max(1, len(entries)), max_lora_rank=MAX_LORA_RANK,
                                   max_n=settings["images_per_prompt"], max_prompt_chars=MAX_PROMPT_CHARS,
                                   max_inference_steps=settings["num_inference_steps"])
    engine = DiffusersEngine.from_pretrained(model_dir, name=BASE, config=config)
    for i, entry in enumerate(entries):
        name = entry.get("adapter")
        if not name:
            continue
        prefix = f"{name}/"
        try:
            engine.load_adapter(name, {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)})
        except ServingError as exc:
            engine.close()
            raise InvalidRequestError(f"model {entry['id']!r} could not be loaded onto its base model: {exc.message}",
                                      param=f"models[{i}]") from None
    return engine


def _clip(channel: Channel, evaluators: dict[str, Any], device: Any) -> tuple[Any, dict[str, Any]]:
    """The CLIP evaluator (None without one, or when it cannot be loaded) and what the result says of CLIP-T."""
    from appliance.diffusion.evaluation import Evaluators

    if "clip" not in evaluators:
        channel.event("No CLIP evaluator model is imported: CLIP-T is not measured")
        return None, {"metric": f"CLIP-T {NO_CLIP}", "evaluators": None}
    ref = evaluators["clip"]
    failed: list[str] = []

    def unusable(family: str, folder: Path, exc: Exception) -> None:
        failed.append(type(exc).__name__)  # the type only: a message might quote a path

    clip = Evaluators(Path(ref["path"]), None, device, on_error=unusable)
    if not clip.names:
        reason = f"CLIP-T not measured: the CLIP evaluator {ref['name']!r} could not be loaded ({failed[0]})"
        channel.event(reason, level="warn")
        return None, {"metric": reason, "evaluators": None}
    channel.event(f"CLIP-T is measured with the evaluator model {ref['name']} (clip)")
    return clip, {"metric": CLIP_T_METRIC, "evaluators": {"clip": ref["name"]}}


def kept_image(png: bytes) -> bytes:
    """An image as kept in the result file: the PNG up to :data:`KEPT_PNG_SIDE` px, else JPEG (quality 90), so that
    a file of 1024 px SDXL images stays tens of MB rather than hundreds (the figures come from the PNGs)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if max(image.size) <= KEPT_PNG_SIDE:
        return png
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def _generate(engine: Any, model: str, prompts: list[str], settings: dict[str, int], kept: int, clip: Any, *,
              stop: Any, progress: Reporter) -> tuple[dict[str, Any], list[list[bytes]]]:
    """One model's figures and the images of its first ``kept`` prompts (:func:`kept_image`); raises Cancelled
    when ``stop()`` says so."""
    from PIL import Image

    from appliance.trainkit.errors import Cancelled

    per = settings["images_per_prompt"]
    kept_pngs: list[list[bytes]] = []
    pending: list[tuple[str, Any]] = []  # (prompt, image) pairs not yet embedded
    total = count = 0.0

    def embed() -> None:
        nonlocal total, count
        if clip is not None and pending:
            total += clip.clip_t(pending) * len(pending)
            count += len(pending)
        pending.clear()

    for j, prompt in enumerate(prompts):
        if stop():
            raise Cancelled
        pngs = engine.generate(prompt, model=model, n=per, seed=settings["seed"] + j * per,
                               num_inference_steps=settings["num_inference_steps"])
        if j < kept:
            kept_pngs.append([kept_image(png) for png in pngs])
        if clip is not None:
            pending.extend((prompt, Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs)
            if len(pending) >= CLIP_T_CHUNK:
                embed()
        progress("images", j + 1, len(prompts))
    embed()
    return {"prompts": len(prompts), "images": len(prompts) * per,
            "clip_t": total / count if count else None}, kept_pngs
