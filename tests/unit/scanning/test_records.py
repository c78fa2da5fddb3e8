from __future__ import annotations

import pytest

from appliance.errors import InvalidRequestError
from appliance.scanning import iter_text_fields, validate_record


def test_chat_fields_with_string_and_part_content():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello!", "weight": 1},
        ],
        "metadata": {"ignored": True},
    }
    assert list(iter_text_fields(record)) == [
        ("messages[0].content", "Be brief."),
        ("messages[1].content[0].text", "Hi"),
        ("messages[1].content[1].text", "there"),
        ("messages[2].content", "Hello!"),
    ]


def test_completion_and_text_fields():
    assert list(iter_text_fields({"prompt": "Q", "completion": "A"})) == [("prompt", "Q"), ("completion", "A")]
    assert list(iter_text_fields({"text": "T"})) == [("text", "T")]


@pytest.mark.parametrize(
    ("record", "param", "fragment"),
    [
        ([], "record", "must be a JSON object; got an array"),
        ({"foo": 1}, "record", "got none of them"),
        ({"messages": []}, "messages", "at least one message"),
        ({"messages": "hi"}, "messages", "got a string"),
        ({"messages": ["hi"]}, "messages[0]", "must be an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "got 'bot'"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "got nothing"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "is missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "got a number"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
            "a part of another type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content[0].text", "got null"),
        ({"prompt": "q"}, "completion", "is missing"),
        ({"prompt": "q", "completion": ["a"]}, "completion", "got an array"),
        ({"text": {"a": 1}}, "text", "got an object"),
        ({"text": "t", "prompt": "p", "completion": "c"}, "record", "must not also have"),
        ({"messages": [{"role": "user", "content": "x"}], "text": "t"}, "record", "must not also have `text`"),
    ],
)
def test_shape_errors_name_the_field(record, param, fragment):
    with pytest.raises(InvalidRequestError) as info:
        validate_record(record)
    assert info.value.param == param
    assert fragment in info.value.message


def test_all_roles_accepted():
    roles = ["system", "developer", "user", "assistant", "tool"]
    validate_record({"messages": [{"role": r, "content": "x"} for r in roles]})


def test_odd_role_values_are_not_echoed():
    with pytest.raises(InvalidRequestError) as info:
        validate_record({"messages": [{"role": "AKIAQ3EGRX5BLWZ7TY4P", "content": "x"}]})
    assert "AKIA" not in info.value.message
    assert "got a string" in info.value.message
