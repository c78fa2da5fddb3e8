"""Sample generations: a few held-out validation prompts answered before and after training, side by side.

Validation loss can fall while the answers stay wrong (or learn the scanner's ``<PERSON>``
placeholders); reading a few answers shows it at a glance. After training, the first
:data:`SAMPLES` validation examples (the seeded split's order) are answered greedily, up
to :data:`MAX_NEW_TOKENS` tokens, by the base model (the LoRA adapter disabled: the same
weights as before training) and by the fine-tuned one, beside the reference answer.

The samples carry validation text (already redacted by the project's policy): the worker
sends them as an encrypted result file, never in the job's details, events or logs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from appliance.trainkit.errors import Cancelled
from appliance.training.data import IGNORE_INDEX, Example
from appliance.training.memorization import _standard_attention

SAMPLES = 3
MAX_NEW_TOKENS = 64
#: The result file's name and format.
FILENAME = "samples.json"
FORMAT = "appliance.samples/1"


def sample_generations(model: Any, tokenizer: Any, examples: Sequence[Example], device: torch.device, *,
                       n: int = SAMPLES, max_new_tokens: int = MAX_NEW_TOKENS,
                       stop: Callable[[], bool] = lambda: False) -> list[dict[str, str]]:
    """``[{"prompt", "reference", "before", "after"}]`` for the first ``n`` examples that have a prompt and a target.

    ``model`` is the trained PEFT model; ``before`` is its generation with the adapter disabled.

    Raises:
        Cancelled: ``stop`` said so between two generations.
    """
    out: list[dict[str, str]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with _standard_attention(model):
        for example in examples:
            if len(out) == n:
                break
            first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), None)
            if not first:  # no target, or nothing before it to prompt with
                continue
            prompt = list(example.input_ids[:first])
            target = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
            ids = torch.tensor([prompt], device=device)

            def generate() -> str:
                if stop():
                    raise Cancelled
                with torch.no_grad():
                    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad)
                return tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True).strip()

            with model.disable_adapter():
                before = generate()
            out.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True).strip(),
                        "reference": tokenizer.decode(target, skip_special_tokens=True).strip(),
                        "before": before, "after": generate()})
    return out
