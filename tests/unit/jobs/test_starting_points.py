"""The model card's memory column and the job form's recommendation (issue 24: choosing the base model)."""

from __future__ import annotations

import json

import pytest

from appliance.diffusion.single_file import write_pipeline_configs
from appliance.jobs.planning import recommendation, starting_points
from appliance.training.planner import GIB, Device
from tests.unit.training.test_planner import LLAMA3_8B

pytestmark = pytest.mark.no_database


@pytest.fixture
def llama3_8b(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, "model_type": "llama"}))
    return tmp_path


def test_llama3_8b_lora_fits_80gb_and_is_recommended(llama3_8b):
    points = starting_points(llama3_8b, "llm", Device("cuda", 80 * GIB, "H100"))
    lora, qlora = points
    assert lora["method"] == "lora" and lora["fits"] and qlora["fits"]
    assert qlora["predicted_peak_gib"] < lora["predicted_peak_gib"] < 80
    assert "tokens a micro-batch" in lora["chosen"]
    assert recommendation(points, "llm").startswith("Start with LoRA: it fits")


def test_llama3_8b_on_16gb_recommends_qlora_and_says_why_lora_does_not_fit(llama3_8b):
    points = starting_points(llama3_8b, "llm", Device("cuda", 16 * GIB, "RTX 4080"))
    lora, qlora = points
    assert lora["fits"] is False and "method.type 'qlora'" in lora["problem"]  # the refusal names the alternative
    assert qlora["fits"] and qlora["predicted_peak_gib"] < 16
    assert recommendation(points, "llm").startswith("Start with QLoRA: LoRA does not fit")


def test_sdxl_card_plans_each_image_method(tmp_path):
    pipeline = write_pipeline_configs("xl_base", tmp_path / "sdxl")
    points = {p["method"]: p for p in starting_points(pipeline, "diffusion", Device("cuda", 24 * GIB, "L4"))}
    assert set(points) == {"lora", "dreambooth_lora", "dreambooth"}
    # On a 24 GB card at SDXL's 1024 px: text-to-image LoRA's default batch (4) does not fit, one subject's
    # DreamBooth+LoRA (batch 1) does with gradient checkpointing, full DreamBooth does not
    assert points["lora"]["fits"] is False and "train_batch_size` 1" in points["lora"]["problem"]
    assert points["dreambooth_lora"]["fits"] and points["dreambooth_lora"]["predicted_peak_gib"] < 24
    assert points["dreambooth_lora"]["chosen"] == "1024 px, gradient checkpointing"
    assert points["dreambooth"]["fits"] is False and "'dreambooth_lora' instead" in points["dreambooth"]["problem"]
    assert recommendation(list(points.values()), "diffusion").startswith("Start with DreamBooth+LoRA: ")
    at_80 = starting_points(pipeline, "diffusion", Device("cuda", 80 * GIB, "H100"))
    assert all(p["fits"] for p in at_80)
    assert recommendation(at_80, "diffusion").startswith("Start with LoRA (or DreamBooth+LoRA for one subject)")


def test_an_unplannable_config_says_so_and_recommends_nothing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    points = starting_points(tmp_path, "llm", Device("cuda", 24 * GIB, "x"))
    assert all(p["fits"] is None and "cannot be planned" in p["problem"] for p in points)
    (tmp_path / "config.json").write_text("not json")
    assert all(p["fits"] is None for p in starting_points(tmp_path, "llm", Device("cuda", 24 * GIB, "x")))
    assert recommendation(points, "llm") is None
    assert starting_points(tmp_path, "evaluator", Device("cuda", 24 * GIB, "x")) == []
