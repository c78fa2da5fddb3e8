"""Test-set figures of one causal LM: target-token loss and perplexity, exact match and token F1.

The loss is training's validation loss (:func:`appliance.training.trainer._evaluate`'s maths): the
records are tokenised by :func:`appliance.training.data.tokenize_records` (loss on the assistant
turns, the completion, or the whole text) and packed as training packs them, and the figure is the
mean over every target token of the file; perplexity is its exponential. A record whose first
target span has tokens before it (a chat with an assistant answer, a prompt/completion pair) has a
reference answer: the model answers its prompt greedily, and the answer is compared with the
reference as SQuAD's evaluation script does (lower case, no punctuation, no articles, single spaces).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from appliance.trainkit.errors import Cancelled
from appliance.training.data import IGNORE_INDEX, Example
from appliance.training.packing import pack, packed_loss_sum

#: Tokens per packed forward pass when measuring the loss (training's validation uses the same).
EVAL_TOKEN_BUDGET = 8192
#: Most prompts answered in one batched ``generate`` call.
ANSWER_BATCH = 16
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the normalised answer equals the normalised reference."""
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the normalised answers' words."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Question:
    """A record's prompt (every token before its first target) and reference answer (that first target span)."""

    prompt: tuple[int, ...]
    reference: tuple[int, ...]


def question_of(example: Example) -> Question | None:
    """The record's prompt and reference answer; None for records without a prompt (plain text)."""
    first = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), None)
    if not first:
        return None
    end = next((i for i in range(first, len(example.labels)) if example.labels[i] == IGNORE_INDEX),
               len(example.labels))
    return Question(tuple(example.input_ids[:first]), tuple(example.input_ids[first:end]))


@dataclass(frozen=True)
class Score:
    """One model's figures on a test file.

    Attributes:
        loss: Mean next-token loss per target token (nats); NaN when the file has no target tokens
            (every answer cut away at the model's context).
        perplexity: ``exp(loss)``; NaN with the loss.
        records: Records of the file.
        target_tokens: Tokens the loss is the mean over.
        answered: Records with a reference answer, each answered by the model.
        exact_match: Share of those answers equal to the reference (normalised); None without any.
        token_f1: Mean token F1 of those answers; None without any.
    """

    loss: float
    perplexity: float
    records: int
    target_tokens: int
    answered: int
    exact_match: float | None
    token_f1: float | None

    def to_dict(self) -> dict[str, Any]:
        """The figures as JSON: a figure that is not finite (NaN: not measured) is None.

        The result frame and the evaluation's row are JSON, and PostgreSQL's ``json`` refuses NaN.
        """
        return {key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in asdict(self).items()}


#: Told how far a phase is: ``(phase, done, total)``, phase ``"loss"`` (records) or ``"answers"`` (prompts).
Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


def target_loss(model: Any, examples: Sequence[Example], device: torch.device, *,
                stop: Callable[[], bool] = lambda: False, progress: Progress = _no_progress) -> tuple[float, int]:
    """Summed loss over the target tokens of ``examples`` and how many there are (packed as training packs).

    ``model``: a transformers causal LM, or a PEFT model (its active adapter applies). ``progress`` is told
    the records done after each forward pass.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    total, count, start = 0.0, 0, 0
    with torch.no_grad():
        while start < len(examples):
            if stop():
                raise Cancelled
            end, tokens = start + 1, len(examples[start])
            while end < len(examples) and tokens + len(examples[end]) <= EVAL_TOKEN_BUDGET:
                tokens += len(examples[end])
                end += 1
            batch = pack(examples[start:end]).to(device)
            if batch.n_targets:
                total += float(packed_loss_sum(causal_lm, batch))
            count += batch.n_targets
            start = end
            progress("loss", end, len(examples))
    return total, count


def answers(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], device: torch.device,
            max_new_tokens: int, *, batch_size: int = ANSWER_BATCH, stop: Callable[[], bool] = lambda: False,
            progress: Progress = _no_progress) -> list[str]:
    """The model's greedy answers to ``prompts`` (token ids), in their order, decoded without special tokens.

    Prompts of similar lengths are answered together, left-padded (the attention mask keeps the padding
    out, and generation counts positions from it): the same answers as one prompt at a time, faster.
    A batch is at most ``batch_size`` prompts and :data:`EVAL_TOKEN_BUDGET` tokens, answers included;
    ``progress`` is told the prompts answered after each.

    Raises:
        Cancelled: ``stop`` said so between two batches.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    start = 0
    while start < len(order):
        if stop():
            raise Cancelled
        end = start + 1
        while (end < len(order) and end - start < batch_size
               and (len(prompts[order[end]]) + max_new_tokens) * (end - start + 1) <= EVAL_TOKEN_BUDGET):
            end += 1
        chunk = order[start:end]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            if prompts[i]:
                ids[row, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad)
        for row, i in enumerate(chunk):
            new = generated[row, width:].tolist()
            # An answer ends at its first end-of-sequence token; what follows is the batch's padding.
            end_at = next((k for k, token in enumerate(new) if token in eos), len(new))
            out[i] = tokenizer.decode(new[:end_at], skip_special_tokens=True).strip()
        start = end
        progress("answers", end, len(prompts))
    return out


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the generation config's and the tokenizer's end-of-sequence ids."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def score(model: Any, tokenizer: Any, examples: Sequence[Example], device: torch.device, *,
          max_new_tokens: int, stop: Callable[[], bool] = lambda: False,
          progress: Progress = _no_progress) -> tuple[Score, list[str | None]]:
    """The model's :class:`Score` on ``examples`` and its answer to each (None where a record has no prompt).

    ``progress`` is told how far the loss pass, then the answers, are.

    Raises:
        Cancelled: ``stop`` said so between two forward passes or two batches of answers.
    """
    was_training = model.training
    model.eval()
    try:
        loss_sum, n_targets = target_loss(model, examples, device, stop=stop, progress=progress)
        questions = [question_of(example) for example in examples]
        asked = [q for q in questions if q is not None]
        texts = answers(model, tokenizer, [q.prompt for q in asked], device, max_new_tokens, stop=stop,
                        progress=progress)
        said = iter(texts)
        replies: list[str | None] = [None if q is None else next(said) for q in questions]
        matches, f1s = [], []
        for question, text in zip(asked, texts):
            reference = tokenizer.decode(question.reference, skip_special_tokens=True).strip()
            matches.append(exact_match(text, reference))
            f1s.append(token_f1(text, reference))
    finally:
        model.train(was_training)
    loss = loss_sum / n_targets if n_targets else float("nan")
    return Score(
        loss=loss, perplexity=math.exp(min(loss, 700.0)) if n_targets else float("nan"), records=len(examples),
        target_tokens=n_targets, answered=len(matches),
        exact_match=sum(matches) / len(matches) if matches else None,
        token_f1=sum(f1s) / len(f1s) if f1s else None,
    ), replies
