"""The evaluation worker's task on a tiny model, through a channel that records what it would send."""

from __future__ import annotations

import io
import json
import threading

import pytest

from appliance.catalog.archive import pack_files
from appliance.evaluations.task import FILENAME, FORMAT, run_evaluation
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


def lora_files(base_dir) -> dict[str, bytes]:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
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


def test_a_stop_ends_it_as_cancelled_with_nothing_sent(tiny):
    channel = RecordingChannel()
    channel.stop.set()
    run_evaluation(channel, {"model_dir": str(tiny), "samples": 1, "max_tokens": 4,
                             "models": [{"id": "tiny", "adapter": None}]}, RECORDS, b"")
    assert channel.frames[-1] == {"type": "cancelled"} and not channel.artefacts
