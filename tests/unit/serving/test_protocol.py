"""Request parsing and validation, and the OpenAI response shapes."""

from __future__ import annotations

import json

import pytest

from appliance.errors import InvalidRequestError
from serving.protocol import (
    Choice,
    Delta,
    GenerationResult,
    Usage,
    chat_chunks,
    chat_completion,
    completion,
    completion_chunks,
    parse_chat_request,
    parse_completion_request,
    sse,
)

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return parse_chat_request({"model": "m", "messages": MSG, **kw}, max_context=100)


def test_parses_openai_chat_request_with_parts_and_reports_unknown_fields():
    req = parse_chat_request(json.dumps({
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "temperature": 0, "stop": "x", "seed": 7, "n": 2,
        "stream": True, "stream_options": {"include_usage": True},
        "top_k": 3, "guided_json": {}, "ignored_fields": "mine",
    }).encode())
    assert req.messages[1].text() == "a\nb"
    assert req.requested_max_tokens == 5 and req.stop_list == ["x"] and req.include_usage
    assert req.ignored_fields == ("guided_json", "ignored_fields", "top_k")
    assert "ignored_fields" not in req.to_dict() and req.to_dict()["max_completion_tokens"] == 5
    # vLLM refuses `"name": null` in a message (a 400 with 14 validation errors): nulls never go upstream.
    assert all("name" not in m and None not in m.values() for m in req.to_dict()["messages"])


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("temperature", 2.5, "between 0 and 2, got 2.5"),
    ("temperature", -0.1, "got -0.1"),
    ("top_p", 0, "greater than 0"),
    ("n", 9, "between 1 and 8, got 9"),
    ("n", 0, "got 0"),
    ("max_tokens", 0, "at least 1, got 0"),
    ("max_tokens", 101, "context length 100, got 101"),
    ("max_completion_tokens", -3, "got -3"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
    ("stop", [""], "must not be empty"),
    ("stream_options", {"include_usage": True}, "only allowed with `stream`"),
    ("logprobs", True, "not supported"),
    ("frequency_penalty", 0.5, "not supported"),
    ("tools", [{"type": "function"}], "not supported"),
    ("response_format", {"type": "json_object"}, "not supported"),
])
def test_sampling_errors_name_the_field_and_value(field, value, needle):
    with pytest.raises(InvalidRequestError) as err:
        chat(**{field: value})
    assert err.value.param == field
    assert f"`{field}`" in err.value.message and needle in err.value.message


def test_type_errors_name_the_field():
    with pytest.raises(InvalidRequestError) as err:
        chat(temperature="hot")
    assert err.value.param == "temperature" and "'hot'" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_request({"model": "m"})
    assert "messages" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_request(b"{not json")
    assert "not valid JSON" in err.value.message


def test_message_checks():
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_request({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    assert err.value.param == "messages[0].role" and "'wizard'" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_request({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert err.value.param == "messages[0].content[0]" and "only text" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        parse_chat_request({"model": "m", "messages": []})
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequestError) as err:
        chat(max_tokens=3, max_completion_tokens=4)
    assert err.value.param == "max_completion_tokens"


def test_completion_request_defaults_and_limits():
    req = parse_completion_request({"model": "m", "prompt": ["a", "b"], "n": 2})
    assert req.max_tokens == 16 and req.prompts == ["a", "b"]
    with pytest.raises(InvalidRequestError) as err:
        parse_completion_request({"model": "m", "prompt": ["a"] * 3, "n": 3})
    assert "9 choices" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        parse_completion_request({"model": "m", "prompt": "a", "echo": True})
    assert err.value.param == "echo"


def test_response_shapes_and_stream_chunks():
    result = GenerationResult(model="m", choices=[Choice(0, "hello", "stop")], usage=Usage(3, 2))
    body = chat_completion(result, id="chatcmpl-1", created=5).to_dict()
    assert body == {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert completion(result).to_dict()["object"] == "text_completion"

    class Stream(list):
        usage = Usage(3, 2)

    chunks = [c.to_dict() for c in chat_chunks(
        Stream([Delta(0, "hel"), Delta(0, ""), Delta(0, "lo", "length")]), model="m", include_usage=True)]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["hel", "lo"]
    assert chunks[1]["choices"][0]["finish_reason"] is None and chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 5
    assert "usage" not in chunks[1]
    events = b"".join(sse(completion_chunks(Stream([Delta(0, "x", "stop")]), model="m")))
    assert events.endswith(b"data: [DONE]\n\n") and b'"text_completion"' in events
