"""bench/train.py's three arms (ours, Trainer padded, Trainer padding-free) run on CPU, as the GPU script runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_training_benchmark_runs_three_arms_on_the_same_tokens(tmp_path):
    from appliance.modelstore import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "tiny", seed=0)
    out = tmp_path / "train.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train.py"), "--device", "cpu", "--quick", "--model-dir", str(model),
         "--examples", "96", "--no-memory", "--results", "-", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    median = figures["median"]
    assert set(median) == {"ours", "padded", "flattening"}
    # The same tokens and steps on every arm, and the same learning: the tiny model's losses agree closely.
    assert len({(arm["tokens"], arm["steps"]) for arm in median.values()}) == 1
    assert median["ours"]["steps"] == 12 and median["ours"]["tokens"] > 0
    for arm in ("padded", "flattening"):
        assert median[arm]["valid_loss_after"] == pytest.approx(median["ours"]["valid_loss_after"], rel=0.02)
    assert median["padded"]["padding_efficiency"] < 1 == median["flattening"]["padding_efficiency"]
    assert all(arm["tokens_per_second"] > 0 and arm["peak_memory_mib"] >= 0 for arm in median.values())
    assert figures["ratio_vs_padding_free"] == pytest.approx(
        median["ours"]["tokens_per_second"] / median["flattening"]["tokens_per_second"])
    assert "vs padding-free" in done.stdout and "peak mem" in done.stdout
    # Steady state: every arm timed from the end of the warm-up steps on (12 steps here, 8 of warm-up).
    assert all(arm["steady_tokens_per_second"] > 0 for arm in median.values())
    assert "after 8 warm-up steps" in done.stdout
    # Our arm's memory plan beside its measured peak.
    memory = median["ours"]["memory_plan"]
    assert memory["plan"]["predicted_peak_bytes"] > 0 and memory["measured_peak_bytes"] > 0
    assert "measured / predicted" in done.stdout
