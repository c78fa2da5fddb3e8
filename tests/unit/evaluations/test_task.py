"""The evaluation worker's task on a tiny model, through a channel that records what it would send."""

from __future__ import annotations

import io
import json
import threading

import pytest

from appliance.catalog.archive import pack_files
from appliance.evaluations.task import FILENAME, FORMAT, Reporter, run_evaluation
from appliance.modelstore import build_tiny_causal_lm

RECORDS = [{"prompt": f"Item {i}:", "completion": f" box {i}"} for i in range(3)] + [{"text": "no prompt here"}]


class RecordingChannel:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.frames: list[dict] = []
        self.artefacts: dict[str, bytes] = {}

    def event(self, message: str, **kw) -> None:
        self.frames.append({"type": "event", "message": message, **kw})

    def send(self, header: dict, payload: bytes = b"") -> None:
        self.frames.append(header)

    def send_artefact(self, header: dict, source: bytes) -> None:
        self.artefacts[header["name"]] = bytes(source)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("evaltask") / "tiny", seed=0)


def lora_files(base_dir, *, seed: int = 1, rank: int = 2) -> dict[str, bytes]:
    """A LoRA adapter's files for the tiny model, with non-zero weights (so it answers differently)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    config = io.StringIO()
    json.dump(model.peft_config["default"].to_dict(), config, default=list)
    return {"adapter_config.json": config.getvalue().encode(),
            "adapter_model.safetensors": save({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()})}


def test_each_model_is_scored_and_the_generations_go_in_one_result_file(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.evaluations.metrics import score
    from appliance.training.data import tokenize_records

    channel = RecordingChannel()
    adapters = pack_files({f"a1/{name}": data for name, data in lora_files(tiny).items()})
    start = {"model_dir": str(tiny), "samples": 2, "max_tokens": 4,
             "models": [{"id": "tiny", "adapter": None}, {"id": "ft:tiny:p:s:ftjob-1", "adapter": "a1"}]}
    run_evaluation(channel, start, RECORDS, adapters)
    result = channel.frames[-1]
    assert result["type"] == "result"
    base, tuned = result["results"]
    assert base["model"] == "tiny" and tuned["model"] == "ft:tiny:p:s:ftjob-1"
    assert base["answered"] == tuned["answered"] == 3 and base["records"] == 4
    assert base["loss"] != pytest.approx(tuned["loss"])
    # The base model's figures are the plain model's: the adapter is disabled for it, not merely inactive.
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    plain, _ = score(AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True), tokenizer,
                     tokenize_records(RECORDS, tokenizer, param="file"), __import__("torch").device("cpu"),
                     max_new_tokens=4)
    assert base["loss"] == pytest.approx(plain.loss, rel=1e-5)
    report = json.loads(channel.artefacts[FILENAME])
    assert report["format"] == FORMAT and [s["reference"] for s in report["samples"]] == ["box 0", "box 1"]
    assert all(set(s["answers"]) == {"tiny", "ft:tiny:p:s:ftjob-1"} for s in report["samples"])
    # Events carry figures and counts, never the test text.
    events = json.dumps([f for f in channel.frames if f["type"] == "event"])
    assert "box" not in events and "Item" not in events
    # Each model's phases end with a progress report of all done (the ones between are paced).
    ends = [(e["model"], e["phase"], e["done"], e["total"]) for f in channel.frames if f["type"] == "progress"
            for e in [f["data"]] if e["done"] == e["total"]]
    assert "box" not in json.dumps(channel.frames) and "Item" not in json.dumps(channel.frames)
    assert ends == [(1, "loss", 4, 4), (1, "answers", 3, 3), (2, "loss", 4, 4), (2, "answers", 3, 3)], ends


def test_progress_reports_are_paced_and_estimate_the_phase_left():
    now = [100.0]
    channel = RecordingChannel()
    report = Reporter(channel, 0, 2, every_s=1.0, clock=lambda: now[0])
    now[0] = 102.0
    report("loss", 10, 40)  # 10 records in 2 s: 6 s left
    now[0] = 102.5
    report("loss", 20, 40)  # within a second of the last report: not sent
    now[0] = 104.0
    report("loss", 40, 40)
    now[0] = 105.0
    report("answers", 8, 16)  # the answers began at the loss pass's last step: 8 in 1 s
    data = [f["data"] for f in channel.frames]
    assert [(d["phase"], d["done"], d["seconds_left"]) for d in data] == [
        ("loss", 10, 6.0), ("loss", 40, 0.0), ("answers", 8, 1.0)]
    assert data[0] == {"model": 1, "models": 2, "phase": "loss", "done": 10, "total": 40, "seconds_left": 6.0}
    assert [f["message"] for f in channel.frames][0] == "Model 1/2: loss 10 of 40"


def test_a_stop_ends_it_as_cancelled_with_nothing_sent(tiny):
    channel = RecordingChannel()
    channel.stop.set()
    run_evaluation(channel, {"model_dir": str(tiny), "samples": 1, "max_tokens": 4,
                             "models": [{"id": "tiny", "adapter": None}]}, RECORDS, b"")
    assert channel.frames[-1] == {"type": "cancelled"} and not channel.artefacts
