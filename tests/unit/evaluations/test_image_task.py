"""The evaluation worker's image task on the tiny Stable Diffusion pipeline, a LoRA and a DreamBooth fine-tune
trained by the image trainer, and the tiny random CLIP evaluator (its figures mean nothing; they are checked
against the fidelity code image jobs use)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from appliance.catalog.archive import pack_files
from appliance.diffusion import build_tiny_sd_pipeline, train_images
from appliance.diffusion.evaluation import Evaluators
from appliance.diffusion.tiny import build_tiny_clip_model
from appliance.errors import InvalidFieldsError, InvalidRequestError
from appliance.evaluations.image_task import FORMAT, image_prompts, run_image_evaluation
from appliance.evaluations.runner import _checked_progress
from appliance.evaluations.task import FILENAME
from tests.unit.diffusion.conftest import QUICK, disc_dataset, make_spec
from tests.unit.evaluations.test_task import RecordingChannel

PROMPTS = ["a photo of sks disc", "a red disc on the beach", "a blue square"]
MODELS = [{"id": "tiny-sd", "adapter": None}, {"id": "ft:tiny-sd:acme::lora", "adapter": "a1"},
          {"id": "ft:tiny-sd:acme::db", "adapter": "a2"}]
SETTINGS = {"images_per_prompt": 2, "num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: faster without intra-op threads
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-eval")
    base = build_tiny_sd_pipeline(root / "tiny-sd", seed=0)
    data = disc_dataset()
    lora = train_images(make_spec("dreambooth_lora", **{**QUICK, "rank": 4}), base, data, sample_steps=1).artifacts
    full = train_images(make_spec("dreambooth", **QUICK), base, data, sample_steps=1).artifacts
    adapters = pack_files({**{f"a1/{k}": v for k, v in lora.items()}, **{f"a2/{k}": v for k, v in full.items()}})
    return {"base": base, "adapters": adapters, "clip": build_tiny_clip_model(root / "clip", seed=0)}


def start_of(store, *, clip: bool = True, samples: int = len(PROMPTS), models: list[dict] = MODELS) -> dict:
    return {"model_dir": str(store["base"]), "kind": "diffusion", "models": models, "samples": samples,
            "max_tokens": None, "images": SETTINGS,
            "evaluators": {"clip": {"name": "tiny-clip", "path": str(store["clip"])}} if clip else {}}


def run(store, **kw) -> RecordingChannel:
    channel = RecordingChannel()
    run_image_evaluation(channel, start_of(store, **kw), [{"text": p} for p in PROMPTS], store["adapters"])
    return channel


def test_every_model_makes_the_same_seeded_images_and_clip_t_is_the_image_jobs_figure(store):
    channel = run(store)
    result = channel.frames[-1]
    assert result["type"] == "result"
    assert [r["model"] for r in result["results"]] == [m["id"] for m in MODELS]
    assert result["fidelity"]["evaluators"] == {"clip": "tiny-clip"} and "CLIP-T" in result["fidelity"]["metric"]
    report = json.loads(channel.artefacts[FILENAME])
    assert report["format"] == FORMAT and report["settings"] == SETTINGS and report["results"] == result["results"]
    assert [s["prompt"] for s in report["samples"]] == PROMPTS
    assert [s["seeds"] for s in report["samples"]] == [[5, 6], [7, 8], [9, 10]]  # the same for every model
    images = {m["id"]: [[Image.open(io.BytesIO(base64.b64decode(b))) for b in s["images"][m["id"]]]
                        for s in report["samples"]] for m in MODELS}
    assert all(len(per_prompt) == 2 for model in images.values() for per_prompt in model)
    # each fine-tune is applied, and only to its own column
    base, lora, full = (report["samples"][0]["images"][m["id"]] for m in MODELS)
    assert len({base[0], lora[0], full[0]}) == 3

    clip = Evaluators(store["clip"], None, torch.device("cpu"))
    for figures in result["results"]:
        assert figures["prompts"] == 3 and figures["images"] == 6
        prompted = [(p, im.convert("RGB")) for p, per in zip(PROMPTS, images[figures["model"]], strict=True)
                    for im in per]
        ims = [im for _, im in prompted]
        assert figures["clip_t"] == pytest.approx(clip.score(ims, ims, prompted)["clip_t"], rel=1e-6)

    # the same seeds give the same images and figures on a second run
    again = run(store)
    assert again.artefacts[FILENAME] == channel.artefacts[FILENAME]
    assert again.frames[-1] == result

    progress = [f["data"] for f in channel.frames if f.get("type") == "progress"]
    assert {(p["model"], p["models"], p["phase"]) for p in progress} == {(i, 3, "images") for i in (1, 2, 3)}
    assert all(_checked_progress(p) is not None for p in progress)  # the runner keeps them
    # no prompt and no image in an event
    said = json.dumps([f for f in channel.frames if f["type"] == "event"])
    assert not any(p in said for p in PROMPTS) and "iVBOR" not in said


def test_without_a_clip_evaluator_clip_t_is_absent_with_the_reason(store):
    channel = run(store, clip=False, samples=0, models=MODELS[:1])
    result = channel.frames[-1]
    assert all(r["clip_t"] is None for r in result["results"])
    assert result["fidelity"] == {"metric": result["fidelity"]["metric"], "evaluators": None}
    assert result["fidelity"]["metric"].startswith("CLIP-T not measured: no CLIP evaluator model is imported")
    assert channel.artefacts == {}  # samples=0: no images kept


def test_a_cancelled_run_sends_no_images(store):
    channel = RecordingChannel()
    channel.stop.set()
    run_image_evaluation(channel, start_of(store, clip=False, models=MODELS[:1]), [{"text": p} for p in PROMPTS], b"")
    assert channel.frames[-1] == {"type": "cancelled"} and channel.artefacts == {}


def test_records_other_than_one_prompt_per_line_are_refused_naming_each():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(InvalidFieldsError) as info:
        image_prompts([{"text": "ok"}, chat, {"prompt": "a", "completion": "b"}, {"text": "  "}, {"text": "x" * 4001},
                       ["text"]])
    assert [p for p, _ in info.value.problems] == ["file[1].messages", "file[2].prompt", "file[3].text",
                                                   "file[4].text", "file[5]"]
    assert info.value.param == "file[1].messages" and "record 2 is a chat record" in info.value.message
    assert '{"text": "<prompt>"}' in info.value.message and "hi" not in info.value.message
    with pytest.raises(InvalidFieldsError, match="and 2 more"):
        image_prompts([chat] * 7)
    with pytest.raises(InvalidRequestError, match="no prompts"):
        image_prompts([])
