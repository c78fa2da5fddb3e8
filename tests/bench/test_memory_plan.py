"""The memory planner against a measured peak: the demo model, LoRA, one fresh process (bench/memory_plan.py)."""

import pytest

from bench.memory_plan import TOLERANCE, prepare, run_case


@pytest.mark.slow
def test_lora_on_the_demo_model_peaks_within_20_percent_of_the_plan(tmp_path):
    row = run_case(prepare("demo", tmp_path), "lora", 256, 2)
    assert row["params"] > 100e6 and row["checkpointing"] is False
    assert abs(row["ratio"] - 1) <= TOLERANCE, row
    assert all(loss > 0 for loss in row["losses"])
