"""Training records to token ids and loss labels.

Three record shapes, the ones the OpenAI fine-tuning API accepts:

* chat ``{"messages": [{"role", "content", "weight"?}, ...]}``: rendered with
  the model's chat template; loss on the assistant turns only (their content
  and the end-of-turn marker the template puts after it). ``content`` may be a
  string or a list of ``{"type": "text", "text": ...}`` parts, concatenated.
  An assistant message with ``"weight": 0`` is context, not a target.
* ``{"prompt", "completion"}``: raw text, no template; loss on the completion
  and the end-of-sequence token appended to it.
* ``{"text"}``: raw text plus end-of-sequence; loss on every token.

Assistant spans are found by rendering the conversation up to each assistant
turn (with and without it) and mapping those character ranges onto the
tokens' offsets, so any prefix-stable template works, not only templates with
``{% generation %}`` markers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidRequestError

IGNORE_INDEX = -100
_MAX_REPORTED = 20
_ROLES = ("system", "user", "assistant")


class TrainingDataError(InvalidRequestError):
    """Records cannot be used for training; ``problems`` lists ``(param, message)`` pairs."""

    code = "invalid_training_data"

    def __init__(self, problems: list[tuple[str, str]], *, more: int = 0) -> None:
        self.problems = problems
        tail = f"; and {more} more" if more else ""
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems) + tail, param=problems[0][0])


@dataclass(frozen=True)
class Example:
    """One tokenised record.

    Attributes:
        input_ids: Token ids.
        labels: Same length; the token id where the token is a training
            target, :data:`IGNORE_INDEX` elsewhere (unshifted, as in transformers).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss once shifted (the first token predicts nothing before it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    def truncated(self, max_len: int) -> Example:
        return self if len(self) <= max_len else Example(self.input_ids[:max_len], self.labels[:max_len])


def tokenize_records(records: Sequence[Mapping[str, Any]], tokenizer: Any, *, param: str) -> list[Example]:
    """Tokenise records of any of the three shapes, reporting every bad record at once.

    Args:
        records: Parsed JSON objects.
        tokenizer: A fast (offset-reporting) Hugging Face tokenizer.
        param: Name for error messages, e.g. ``train_records``.

    Raises:
        TrainingDataError: Listing the first problems (by record index) and how many more.
    """
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise TrainingDataError([(param, f"must be a list of records; got {type(records).__name__}")])
    if not records:
        raise TrainingDataError([(param, "must contain at least one record; got an empty list")])
    examples: list[Example] = []
    problems: list[tuple[str, str]] = []
    for i, record in enumerate(records):
        where = f"{param}[{i}]"
        try:
            examples.append(_tokenize_one(record, tokenizer, where))
        except _RecordProblem as exc:
            problems.append((exc.param, exc.message))
    if problems:
        raise TrainingDataError(problems[:_MAX_REPORTED], more=max(0, len(problems) - _MAX_REPORTED))
    return examples


def holdout_size(n: int) -> int:
    """How many of ``n`` training examples are held out for validation without a validation file:
    10%, at least one when there are two or more."""
    return 0 if n < 2 else max(1, n // 10)


def split_validation(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out :func:`holdout_size` examples for validation, seeded."""
    n_val = holdout_size(len(examples))
    if not n_val:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def fingerprint(*datasets: Sequence[Example]) -> str:
    """A digest of tokenised datasets: a checkpoint resumes only on the same data."""
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(len(dataset).to_bytes(8, "big"))
        for example in dataset:
            digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()


class _RecordProblem(Exception):
    def __init__(self, param: str, message: str) -> None:
        self.param, self.message = param, message


def _tokenize_one(record: Any, tokenizer: Any, where: str) -> Example:
    if not isinstance(record, Mapping):
        raise _RecordProblem(where, f"must be an object; got {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"], tokenizer, f"{where}.messages")
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise _RecordProblem(f"{where}.{key}", f"must be a string; got {type(value).__name__}")
        if not completion:
            raise _RecordProblem(f"{where}.completion", "must not be empty")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
        return Example(tuple(prompt_ids + completion_ids), tuple([IGNORE_INDEX] * len(prompt_ids) + completion_ids))
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise _RecordProblem(f"{where}.text", f"must be a non-empty string; got {text!r:.40}")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [_eos_id(tokenizer)]
        return Example(tuple(ids), tuple(ids))
    raise _RecordProblem(
        where, f"must have `messages`, `prompt` and `completion`, or `text`; got keys {sorted(record)[:8]!r}"
    )


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise _RecordProblem("model", "the tokenizer has no end-of-sequence token to end completions with")
    return tokenizer.eos_token_id


def _chat_example(messages: Any, tokenizer: Any, where: str) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise _RecordProblem(where, "the base model has no chat template; use prompt/completion or text records")
    if not isinstance(messages, list) or not messages:
        raise _RecordProblem(where, "must be a non-empty list of messages")
    conversation: list[dict[str, str]] = []
    trained: list[bool] = []
    for j, message in enumerate(messages):
        at = f"{where}[{j}]"
        if not isinstance(message, Mapping):
            raise _RecordProblem(at, f"must be an object; got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise _RecordProblem(f"{at}.role", f"must be one of {', '.join(_ROLES)}; got {role!r}")
        if message.get("tool_calls") or message.get("function_call"):
            raise _RecordProblem(at, "tool and function calls are not supported for training")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise _RecordProblem(f"{at}.weight", f"must be 0 or 1; got {weight!r}")
        if weight == 0 and role != "assistant":
            raise _RecordProblem(f"{at}.weight", "is only allowed on assistant messages")
        conversation.append({"role": role, "content": _content_text(message.get("content"), f"{at}.content")})
        trained.append(role == "assistant" and weight == 1)
    if not any(trained):
        raise _RecordProblem(where, "must contain at least one assistant message to learn from")

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        full = render(conversation, False)
        spans = []
        for j, is_target in enumerate(trained):
            if not is_target:
                continue
            before = render(conversation[:j], True)
            through = render(conversation[: j + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise _RecordProblem(
                    where, "the model's chat template renders earlier turns differently as the conversation grows; "
                    "assistant tokens cannot be located (use prompt/completion records)"
                )
            spans.append((len(before), len(through)))
    except _RecordProblem:
        raise
    except Exception as exc:  # jinja raises whatever the template author wrote
        raise _RecordProblem(where, f"the chat template cannot render this conversation: {exc}") from exc

    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, offsets, strict=True)
    ]
    return Example(tuple(ids), tuple(labels))


def _content_text(content: Any, at: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _RecordProblem(f"{at}[{k}]", f"must be a {{'type': 'text', 'text': str}} part; got {part!r:.60}")
            texts.append(part["text"])
        return "".join(texts)
    raise _RecordProblem(at, f"must be a string or a list of text parts; got {type(content).__name__}")
