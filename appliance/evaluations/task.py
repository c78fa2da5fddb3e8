"""What an evaluation worker runs (inside the sandbox): every model on the test file, one after another.

The base model is loaded once; each fine-tune's LoRA adapter (its files streamed in by the runner,
decrypted in memory) is added to it under its own name, and the base model itself is the PEFT model
with its adapters disabled. Figures go back in the result frame (no text); the generations of the
first ``samples`` prompts go back as one result file, never in an event or a log. The figures (exact
match, token F1) are computed here on the raw answers; the runner passes the answers through the
project's output guard before it stores the file (encrypted), so a stored answer may read redacted or
withheld where the figure counted the answer as the model gave it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from appliance.catalog.archive import unpack_files
from appliance.jobs.channel import Channel

#: The result file's name and format.
FILENAME = "evaluation.json"
FORMAT = "appliance.evaluation/1"
#: The context records are cut to when the model's config does not say.
DEFAULT_CONTEXT = 4096


def run_evaluation(channel: Channel, start: dict[str, Any], records: list[dict[str, Any]], adapters: bytes) -> None:
    """Score each of ``start["models"]`` on ``records`` and report over ``channel``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.evaluations.metrics import question_of, score
    from appliance.trainkit.errors import Cancelled
    from appliance.training.data import tokenize_records

    model_dir = Path(start["model_dir"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    examples = tokenize_records(records, tokenizer, param="file")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        device_map={"": device})
    model = _with_adapters(model, unpack_files(adapters) if adapters else {}, start["models"])
    # Records longer than the model's context are cut to it, as training cuts them to max_seq_length.
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    cut = sum(len(e) > context for e in examples)
    examples = [e.truncated(context) for e in examples]
    channel.event(f"Evaluating {len(start['models'])} model(s) on {len(examples)} test records"
                  + (f"; {cut} longer than the model's context of {context} tokens were cut to it" if cut else ""),
                  data={"models": len(start["models"]), "records": len(examples), "cut": cut, "context": context})
    results, answers = [], []
    try:
        for i, entry in enumerate(start["models"]):
            began = time.monotonic()
            with _active(model, entry.get("adapter")):
                figures, said = score(model, tokenizer, examples, device, max_new_tokens=start["max_tokens"],
                                      stop=channel.stop.is_set, progress=Reporter(channel, i, len(start["models"])))
            results.append({"model": entry["id"], **figures.to_dict()})
            answers.append(said)
            channel.event(f"Model {i + 1}/{len(start['models'])} evaluated in {time.monotonic() - began:.1f} s",
                          type="metrics", data=results[-1])
    except Cancelled:
        channel.send({"type": "cancelled"})
        return
    samples = []
    for j, example in enumerate(examples):
        if len(samples) == start["samples"]:
            break
        question = question_of(example)
        if question is None:
            continue
        samples.append({
            "prompt": tokenizer.decode(question.prompt, skip_special_tokens=True).strip(),
            "reference": tokenizer.decode(question.reference, skip_special_tokens=True).strip(),
            "answers": {entry["id"]: answers[i][j] for i, entry in enumerate(start["models"])},
        })
    if samples:
        channel.send_artefact({"kind": "result_file", "name": FILENAME}, json.dumps(
            {"format": FORMAT, "models": [e["id"] for e in start["models"]], "results": results,
             "samples": samples}, ensure_ascii=False).encode())
    channel.send({"type": "result", "results": results})


class Reporter:
    """Sends how far a model's scoring is as ``progress`` events (counts only), at most one a second.

    Each event's data: ``model`` (1-based) of ``models``, ``phase`` (``loss`` or ``answers``), ``done`` of
    ``total`` and ``seconds_left`` in the phase, from its pace so far (None before its first step ends).
    """

    def __init__(self, channel: Channel, index: int, models: int, *, every_s: float = 1.0,
                 clock: Any = time.monotonic) -> None:
        self.channel, self.index, self.models, self.every_s, self.clock = channel, index, models, every_s, clock
        #: the phase and when it began: the scoring began when this was made; a phase, at the last step before it
        self._phase: tuple[str, float] | None = None
        self._last = clock()
        self._sent = float("-inf")

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        if self._phase is None or self._phase[0] != phase:
            self._phase = (phase, self._last)
        self._last = now
        if now - self._sent < self.every_s and done < total:
            return
        self._sent = now
        elapsed = now - self._phase[1]
        left = round(elapsed / done * (total - done), 1) if done and elapsed > 0 else None
        self.channel.event(f"Model {self.index + 1}/{self.models}: {phase} {done} of {total}", type="progress",
                           data={"model": self.index + 1, "models": self.models, "phase": phase, "done": done,
                                 "total": total, "seconds_left": left})


def _with_adapters(model: Any, files: dict[str, bytes], entries: list[dict[str, Any]]) -> Any:
    """``model`` with each entry's adapter (files under ``<adapter>/``) added by that name; unchanged without any."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load as load_safetensors

    peft_model = None
    for entry in entries:
        name = entry.get("adapter")
        if not name:
            continue
        config = json.loads(files[f"{name}/adapter_config.json"])
        fields = LoraConfig.__dataclass_fields__
        lora = LoraConfig(**{k: v for k, v in config.items() if k in fields and k != "peft_type"})
        lora.inference_mode = True
        if peft_model is None:
            peft_model = PeftModel(model, lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
        state = load_safetensors(files[f"{name}/adapter_model.safetensors"])
        set_peft_model_state_dict(peft_model, state, adapter_name=name)
    return model if peft_model is None else peft_model.eval()


class _active:
    """Makes ``adapter`` the model's active one for the block; None: the base model (adapters disabled)."""

    def __init__(self, model: Any, adapter: str | None) -> None:
        self.model, self.adapter, self._disabled = model, adapter, None

    def __enter__(self) -> None:
        if not hasattr(self.model, "disable_adapter"):
            return
        if self.adapter:
            self.model.set_adapter(self.adapter)
        else:
            self._disabled = self.model.disable_adapter()
            self._disabled.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._disabled is not None:
            self._disabled.__exit__(*exc)
