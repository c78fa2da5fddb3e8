import pytest

from appliance.training.data import IGNORE_INDEX, Example, TrainingDataError, split_validation, tokenize_records


def labelled_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_chat_loss_is_on_assistant_turns_only(tokenizer):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "Hello world"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "again"}]},
        ]
    }
    (example,) = tokenize_records([record], tokenizer, param="train_records")
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(record["messages"][:4] + [
        {"role": "assistant", "content": "Hello again"}], tokenize=False)
    assert labelled_text(tokenizer, example) == "Hello world<|im_end|>\nHello again<|im_end|>\n"
    assert len(example.labels) == len(example.input_ids)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))


def test_assistant_weight_zero_is_context(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "wrong", "weight": 0},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "right"},
        ]
    }
    (example,) = tokenize_records([record], tokenizer, param="train_records")
    assert labelled_text(tokenizer, example) == "right<|im_end|>\n"


def test_prompt_completion_and_text(tokenizer):
    pc, text = tokenize_records(
        [{"prompt": "Capital of France?", "completion": " Paris"}, {"text": "hello world"}], tokenizer, param="r"
    )
    assert tokenizer.decode(pc.input_ids) == "Capital of France? Paris<|im_end|>"
    assert labelled_text(tokenizer, pc) == " Paris<|im_end|>"
    assert text.labels == text.input_ids and tokenizer.decode(text.input_ids) == "hello world<|im_end|>"


def test_every_bad_record_is_reported_by_index(tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"text": "fine"},
        {"prompt": "p"},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]}]},
        "not an object",
        {"unknown": 1},
    ]
    with pytest.raises(TrainingDataError) as info:
        tokenize_records(records, tokenizer, param="train_records")
    params = [p for p, _ in info.value.problems]
    assert params == [
        "train_records[0].messages", "train_records[2].completion", "train_records[3].messages[0].role",
        "train_records[4].messages[0].content[0]", "train_records[5]", "train_records[6]",
    ]
    assert "got 'robot'" in info.value.message and info.value.param == "train_records[0].messages"
    with pytest.raises(TrainingDataError, match="at least one record"):
        tokenize_records([], tokenizer, param="val_records")


def test_validation_split_is_seeded_ten_percent():
    examples = [Example((i, i + 1), (i, i + 1)) for i in range(50)]
    train, val = split_validation(examples, seed=3)
    assert len(val) == 5 and len(train) == 45 and set(train).isdisjoint(val)
    assert split_validation(examples, seed=3) == (train, val)
    assert split_validation(examples, seed=4)[1] != val
    assert split_validation(examples[:1], seed=0) == (examples[:1], [])


def test_truncation_and_target_count():
    example = Example((1, 2, 3, 4, 5), (IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5))
    assert example.n_targets == 3
    assert example.truncated(3) == Example((1, 2, 3), (IGNORE_INDEX, IGNORE_INDEX, 3))
    assert example.truncated(2).n_targets == 0
