"""Test-set figures on a tiny seeded model, reproduced with stock transformers."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from appliance.evaluations.metrics import (
    answers,
    exact_match,
    normalize_answer,
    question_of,
    score,
    target_loss,
    token_f1,
)
from appliance.trainkit.errors import Cancelled
from appliance.modelstore import build_tiny_causal_lm
from appliance.training.data import IGNORE_INDEX, tokenize_records

RECORDS = [
    {"messages": [{"role": "user", "content": "Reverse: red sea"}, {"role": "assistant", "content": "sea red"}]},
    {"prompt": "Colour of the sky:", "completion": " blue"},
    {"text": "the quick brown fox"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say yes"},
                  {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Say no"},
                  {"role": "assistant", "content": "no"}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = build_tiny_causal_lm(tmp_path_factory.mktemp("eval") / "tiny", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize(("prediction", "reference", "em", "f1"), [
    ("The Blue  sky.", "blue sky", True, 1.0),
    ("a red box", "the blue box", False, 0.5),
    ("nothing alike", "blue", False, 0.0),
    ("", "", True, 1.0),
    ("", "blue", False, 0.0),
])
def test_exact_match_and_token_f1_follow_squad(prediction, reference, em, f1):
    assert exact_match(prediction, reference) is em
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert normalize_answer("  An Apple, the PEAR!  ") == "apple pear"


def test_the_question_is_the_prompt_before_the_first_answer(tiny):
    _, tokenizer = tiny
    chat, completion, text, multi = tokenize_records(RECORDS, tokenizer, param="records")
    assert question_of(text) is None  # plain text: nothing to prompt with
    q = question_of(completion)
    assert tokenizer.decode(q.reference, skip_special_tokens=True).strip() == "blue"
    q = question_of(multi)  # the first assistant turn only; the second is context for nothing here
    assert tokenizer.decode(q.reference, skip_special_tokens=True).strip() == "yes"
    assert q.prompt == multi.input_ids[:len(q.prompt)]
    assert tokenizer.decode(question_of(chat).reference, skip_special_tokens=True).strip() == "sea red"


def test_loss_is_the_mean_over_target_tokens_as_stock_transformers_computes_it(tiny):
    model, tokenizer = tiny
    examples = tokenize_records(RECORDS, tokenizer, param="records")
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            n = int((labels[0, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    loss_sum, n_targets = target_loss(model, examples, torch.device("cpu"))
    assert n_targets == count == sum(e.n_targets for e in examples)
    assert loss_sum / n_targets == pytest.approx(total / count, rel=1e-4)

    result, answers = score(model, tokenizer, examples, torch.device("cpu"), max_new_tokens=5)
    assert result.loss == pytest.approx(total / count, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    assert (result.records, result.target_tokens, result.answered) == (4, count, 3)
    assert answers[2] is None and all(isinstance(a, str) for i, a in enumerate(answers) if i != 2)
    # The answers are the stock greedy generations, scored against the references.
    references = ["sea red", "blue", "yes"]
    expected = []
    for e in (examples[0], examples[1], examples[3]):
        prompt = torch.tensor([question_of(e).prompt])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=5, pad_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip())
    assert [answers[0], answers[1], answers[3]] == expected
    assert result.exact_match == pytest.approx(sum(exact_match(a, r) for a, r in zip(expected, references)) / 3)
    assert result.token_f1 == pytest.approx(sum(token_f1(a, r) for a, r in zip(expected, references)) / 3)


def test_batched_answers_are_the_answers_one_prompt_at_a_time(tiny):
    """Left-padded batches of prompts of different lengths give each prompt's own greedy answer, in order."""
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    with torch.no_grad():  # larger weights than the seeded init's, so that each prompt gets an answer of its own
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    records = [{"prompt": "Q" + " word" * (i % 7) + f" {i}?", "completion": " yes"} for i in range(11)]
    prompts = [question_of(e).prompt for e in tokenize_records(records + RECORDS, tokenizer, param="records")
               if question_of(e) is not None]
    assert len({len(p) for p in prompts}) > 5  # lengths differ: the batches are padded
    alone = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                             pad_token_id=tokenizer.eos_token_id)
        alone.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    assert len(set(alone)) > len(alone) // 2, alone
    cpu = torch.device("cpu")
    assert answers(model, tokenizer, prompts, cpu, 6) == alone  # all in one batch
    seen = []
    assert answers(model, tokenizer, prompts, cpu, 6, batch_size=4, progress=lambda *a: seen.append(a)) == alone
    assert seen == [("answers", 4, 14), ("answers", 8, 14), ("answers", 12, 14), ("answers", 14, 14)]
    assert answers(model, tokenizer, prompts, cpu, 6, batch_size=1) == alone
    with pytest.raises(Cancelled):
        answers(model, tokenizer, prompts, cpu, 6, stop=lambda: True)


def test_a_file_without_target_tokens_has_its_loss_not_measured_as_none(tiny):
    """Answers cut away at the context leave no target token: the loss is NaN, sent and stored as None (JSON)."""
    import json

    model, tokenizer = tiny
    chat = tokenize_records(RECORDS[:1], tokenizer, param="records")[0]
    first_target = next(i for i, label in enumerate(chat.labels) if label != IGNORE_INDEX)
    figures, replies = score(model, tokenizer, [chat.truncated(first_target)], torch.device("cpu"), max_new_tokens=2)
    assert math.isnan(figures.loss) and math.isnan(figures.perplexity) and figures.target_tokens == 0
    assert replies == [None] and figures.answered == 0
    as_sent = figures.to_dict()
    assert as_sent["loss"] is None and as_sent["perplexity"] is None and as_sent["exact_match"] is None
    json.dumps(as_sent, allow_nan=False)  # what PostgreSQL's json accepts
