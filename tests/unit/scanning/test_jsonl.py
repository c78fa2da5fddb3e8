from __future__ import annotations

import io

import pytest

from appliance.errors import InvalidRequestError
from appliance.scanning import iter_jsonl

GOOD = b'{"text": "one"}\n\n{"prompt": "p", "completion": "c"}\n{"messages": [{"role": "user", "content": "x"}]}'


def read(data: bytes, **kw):
    return list(iter_jsonl(io.BytesIO(data), **kw))


def test_yields_line_numbers_and_skips_blank_lines():
    assert [n for n, _ in read(GOOD)] == [1, 3, 4]
    assert read(b'\xef\xbb\xbf{"text": "bom"}\n') == [(1, {"text": "bom"})]


@pytest.mark.parametrize(
    ("data", "param", "fragment"),
    [
        (b'{"text": "a"}\n{"text": "b",}\n', "line 2", "not valid JSON"),
        (b'{"text": "a"}\n{"text": "caf\xe9"}\n', "line 2", "not valid UTF-8"),
        (b'{"text": "a"}\n\n[1, 2]\n', "line 3", "must be a JSON object"),
        (
            b'{"text": "a"}\n{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}\n',
            "line 2: messages[1].role",
            "must be one of",
        ),
        (b'{"prompt": "p"}\n', "line 1: completion", "is missing"),
    ],
)
def test_errors_name_the_line(data, param, fragment):
    with pytest.raises(InvalidRequestError) as info:
        read(data)
    assert info.value.param == param
    assert fragment in info.value.message
    assert param.split(":")[0] in info.value.message


def test_error_does_not_echo_the_line():
    secret = b"AKIAIOSFODNN7EXAMPLE"
    with pytest.raises(InvalidRequestError) as info:
        read(b'{"text": "' + secret + b'" oops}\n')
    assert "AKIA" not in info.value.message


def test_too_long_line_is_refused_without_reading_it_whole():
    with pytest.raises(InvalidRequestError) as info:
        read(b'{"text": "' + b"x" * 100 + b'"}\n', max_line_bytes=50)
    assert info.value.param == "line 1"
    assert "longer than 50 bytes" in info.value.message


def test_validation_can_be_turned_off():
    assert read(b"[1]\n", validate=False) == [(1, [1])]
