"""OpenAI-compatible request and response shapes, and the engines' result types.

Requests are parsed with :func:`parse_chat_request` / :func:`parse_completion_request`
from a JSON body or a dict: types are checked by msgspec, ranges by
``validate()``, and every problem raises :class:`~serving.errors.InvalidRequestError`
naming the field (``param``) and the value received. Unknown fields are accepted
and ignored, as vLLM does, and their names are kept in ``ignored_fields`` so the
caller can log or echo them. Fields OpenAI defines but the engines do not
implement (``logprobs``, ``tools``, penalties, ...) are refused when set to
anything but their neutral value, never silently dropped.

Engines answer with :class:`GenerationResult` (whole) or a stream of
:class:`Delta`; :func:`chat_completion`, :func:`chat_chunks` and friends turn
those into the OpenAI response objects, and :func:`sse` into server-sent events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from serving.errors import ROLE_LIKE, InvalidRequestError, echo

__all__ = [
    "MAX_N",
    "MAX_STOP",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Choice",
    "Completion",
    "CompletionRequest",
    "ContentPart",
    "Delta",
    "FinishReason",
    "GenerationResult",
    "GenerationRequest",
    "StreamOptions",
    "Usage",
    "chat_chunks",
    "chat_completion",
    "completion",
    "completion_chunks",
    "message_text",
    "new_id",
    "parse_chat_request",
    "parse_completion_request",
    "sse",
]

#: Most choices one request may ask for (``n``); each is a row of the batch.
MAX_N = 8
#: Most stop strings one request may give (OpenAI's limit).
MAX_STOP = 4
ROLES = ("system", "developer", "user", "assistant")

FinishReason = Literal["stop", "length"]


# --------------------------------------------------------------------------- requests


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        return message_text(self.content)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions``. ``model`` is the base model's name or an adapter's."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    #: vLLM's extension: keep generating past the end-of-sequence token (benchmarks).
    ignore_eos: bool = False
    # Defined by OpenAI, not implemented: accepted only at their neutral value.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    #: Names of request fields that were not understood and were ignored.
    ignored_fields: tuple[str, ...] = ()

    @property
    def kind(self) -> Literal["chat"]:
        return "chat"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def validate(self, max_context: int | None = None) -> ChatCompletionRequest:
        """Check ranges and combinations; raise :class:`InvalidRequestError` on the first problem.

        Args:
            max_context: The serving model's context length, to bound ``max_tokens``.
        """
        if not self.model:
            raise _invalid("model", "`model` must name the base model or a loaded adapter")
        if not self.messages:
            raise _invalid("messages", "`messages` must hold at least one message, got an empty list")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise _invalid(f"messages[{i}].role",
                               f"`messages[{i}].role` must be one of {', '.join(ROLES)}; got {echo(m.role, ROLE_LIKE)}")
            if m.content is None:
                raise _invalid(f"messages[{i}].content", f"`messages[{i}].content` is missing")
            if isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise _invalid(
                            f"messages[{i}].content[{j}]",
                            f"`messages[{i}].content[{j}]` has type {part.type!r}; only text parts "
                            '({"type": "text", "text": ...}) are supported',
                        )
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise _invalid(
                "max_completion_tokens",
                f"`max_tokens` ({self.max_tokens}) and `max_completion_tokens` ({self.max_completion_tokens}) "
                "disagree; send only `max_completion_tokens`",
            )
        for name in ("max_tokens", "max_completion_tokens"):
            _check_max_tokens(name, getattr(self, name), max_context)
        _check_sampling(self.temperature, self.top_p, self.n, self.stop, self.seed)
        _check_stream(self.stream, self.stream_options)
        _check_neutral(self, ("logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"))
        if self.tools:
            raise _invalid("tools", "`tools` (function calling) is not supported by this server; remove it")
        if self.tool_choice not in (None, "none"):
            raise _invalid("tool_choice", f"`tool_choice` {self.tool_choice!r} is not supported; remove it")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise _invalid(
                "response_format",
                f"`response_format` {self.response_format!r} is not supported; only {{'type': 'text'}}",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The request as OpenAI JSON, without unset fields (what the vLLM client sends upstream)."""
        return _to_wire(self)


class CompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/completions`` (legacy text completions). ``max_tokens`` defaults to 16 as in OpenAI."""

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignored_fields: tuple[str, ...] = ()

    @property
    def kind(self) -> Literal["completion"]:
        return "completion"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def validate(self, max_context: int | None = None) -> CompletionRequest:
        """Check ranges and combinations; raise :class:`InvalidRequestError` on the first problem."""
        if not self.model:
            raise _invalid("model", "`model` must name the base model or a loaded adapter")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _invalid("prompt", "`prompt` must be a string or a non-empty list of strings")
        if len(self.prompts) * self.n > MAX_N:
            raise _invalid(
                "prompt",
                f"{len(self.prompts)} prompts × `n`={self.n} make {len(self.prompts) * self.n} choices; "
                f"at most {MAX_N} per request",
            )
        _check_max_tokens("max_tokens", self.max_tokens, max_context)
        _check_sampling(self.temperature, self.top_p, self.n, self.stop, self.seed)
        _check_stream(self.stream, self.stream_options)
        _check_neutral(self, ("logprobs", "suffix", "presence_penalty", "frequency_penalty", "logit_bias"))
        if self.echo:
            raise _invalid("echo", "`echo` is not supported; remove it")
        if self.best_of is not None and self.best_of != self.n:
            raise _invalid("best_of", f"`best_of` ({self.best_of}) other than `n` is not supported; remove it")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_wire(self)


GenerationRequest = ChatCompletionRequest | CompletionRequest


def parse_chat_request(body: bytes | str | Mapping[str, Any], max_context: int | None = None) -> ChatCompletionRequest:
    """Parse and validate a chat completion request body (JSON bytes/str or a decoded dict)."""
    return _parse(body, ChatCompletionRequest).validate(max_context)


def parse_completion_request(
    body: bytes | str | Mapping[str, Any], max_context: int | None = None
) -> CompletionRequest:
    """Parse and validate a text completion request body (JSON bytes/str or a decoded dict)."""
    return _parse(body, CompletionRequest).validate(max_context)


def _parse(body: bytes | str | Mapping[str, Any], cls: type[msgspec.Struct]) -> Any:
    if isinstance(body, (bytes, str)):
        try:
            body = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise InvalidRequestError(f"the request body is not valid JSON: {exc}", param=None) from None
        except RecursionError:  # msgspec's answer to ``[[[[...`` deeper than the interpreter's limit
            raise InvalidRequestError("the request body is not valid JSON: it is nested too deeply",
                                      param=None) from None
        except UnicodeDecodeError:
            raise InvalidRequestError("the request body is not valid JSON: it is not valid UTF-8",
                                      param=None) from None
    if not isinstance(body, Mapping):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    known = set(cls.__struct_fields__) - {"ignored_fields"}
    data = {k: v for k, v in body.items() if k in known}
    ignored = tuple(sorted(str(k) for k in body if k not in known))
    try:
        req = msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `float`, got `str` - at `$.temperature`".
        msg = str(exc)
        param = msg.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in msg else None
        if param is not None:
            got = _dig(body, param)
            msg = f"`{param}`: {msg.split(' - at ')[0]} (got {got!r})"
        raise InvalidRequestError(msg, param=param) from None
    return msgspec.structs.replace(req, ignored_fields=ignored)


def _dig(body: Mapping[str, Any], path: str) -> Any:
    cur: Any = body
    for part in path.replace("]", "").replace("[", ".").split("."):
        try:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    if isinstance(cur, str) and len(cur) > 40:
        return cur[:40] + "…"
    return cur


def message_text(content: Any) -> str:
    """A message's content as one string: a string as is, text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join((p.get("text") or "") if isinstance(p, Mapping) else (getattr(p, "text", None) or "")
                     for p in content)


def _invalid(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _check_max_tokens(name: str, value: int | None, max_context: int | None) -> None:
    if value is None:
        return
    if value < 1:
        raise _invalid(name, f"`{name}` must be at least 1, got {value}")
    if max_context is not None and value > max_context:
        raise _invalid(name, f"`{name}` must be at most the model's context length {max_context}, got {value}")


def _check_sampling(temperature: float | None, top_p: float | None, n: int, stop: Any, seed: int | None) -> None:
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise _invalid("temperature", f"`temperature` must be between 0 and 2, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise _invalid("top_p", f"`top_p` must be greater than 0 and at most 1, got {top_p}")
    if not 1 <= n <= MAX_N:
        raise _invalid("n", f"`n` must be between 1 and {MAX_N}, got {n}")
    stops = _stop_list(stop)
    if len(stops) > MAX_STOP:
        raise _invalid("stop", f"`stop` may hold at most {MAX_STOP} strings, got {len(stops)}")
    for s in stops:
        if not s:
            raise _invalid("stop", "`stop` strings must not be empty, got ''")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise _invalid("seed", f"`seed` must fit in 64 bits, got {seed}")


def _check_stream(stream: bool, options: StreamOptions | None) -> None:
    if options is not None and not stream:
        raise _invalid("stream_options", "`stream_options` is only allowed with `stream`: true")


_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}


def _check_neutral(req: Any, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(req, name)
        if value not in _NEUTRAL[name]:
            raise _invalid(name, f"`{name}` is not supported by this server, got {value!r}; remove it")


def _to_wire(req: msgspec.Struct) -> dict[str, Any]:
    out = msgspec.to_builtins(req)
    out.pop("ignored_fields", None)
    if not out.get("ignore_eos"):
        out.pop("ignore_eos", None)
    return _without_nulls(out)


def _without_nulls(value: Any) -> Any:
    """``value`` with every ``None`` member of every object dropped, at any depth.

    vLLM's request models refuse ``null`` where OpenAI's schema has an optional
    string (``"name": null`` in a message is a 400 there), so unset fields are left out.
    """
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# --------------------------------------------------------------------------- engine results


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class Delta:
    """New text of one choice. The last delta of a choice carries its ``finish_reason``.

    ``text`` never ends inside a multi-byte character and never contains (a
    prefix of) a stop string; it may be empty on the finishing delta.
    """

    index: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    text: str
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """A finished generation; ``model`` is the name the request used."""

    model: str
    choices: list[Choice]
    usage: Usage
    #: Seconds from submission to the first generated token (0 if none or unknown).
    time_to_first_token_s: float = 0.0


# --------------------------------------------------------------------------- responses


class ResponseMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


class UsageBody(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class DeltaMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageBody | None = None

    def to_dict(self) -> dict[str, Any]:
        out = msgspec.to_builtins(self)
        out["object"] = self.object  # omit_defaults must not drop the object type
        return out


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A ``text_completion``, whole or as one streamed chunk (then ``usage`` is absent)."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None

    def to_dict(self) -> dict[str, Any]:
        out = msgspec.to_builtins(self)
        out["object"] = self.object
        return out


def new_id(prefix: str = "chatcmpl") -> str:
    """A fresh response id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(u: Usage) -> UsageBody:
    return UsageBody(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def chat_completion(result: GenerationResult, *, id: str | None = None, created: int | None = None) -> ChatCompletion:
    """The ``chat.completion`` object for a finished generation."""
    return ChatCompletion(
        id=id or new_id("chatcmpl"),
        created=created if created is not None else int(time.time()),
        model=result.model,
        choices=[
            ChatChoice(index=c.index, message=ResponseMessage(content=c.text), finish_reason=c.finish_reason)
            for c in result.choices
        ],
        usage=_usage(result.usage),
    )


def completion(result: GenerationResult, *, id: str | None = None, created: int | None = None) -> Completion:
    """The ``text_completion`` object for a finished generation."""
    return Completion(
        id=id or new_id("cmpl"),
        created=created if created is not None else int(time.time()),
        model=result.model,
        choices=[CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason) for c in result.choices],
        usage=_usage(result.usage),
    )


def chat_chunks(
    stream: Iterable[Delta],
    *,
    model: str,
    n: int = 1,
    include_usage: bool = False,
    id: str | None = None,
    created: int | None = None,
) -> Iterator[ChatCompletionChunk]:
    """``chat.completion.chunk`` objects for a stream: a role chunk per choice, content, finish, usage.

    Every chunk has the same ``id`` and ``created``. With ``include_usage``, a last
    chunk with empty ``choices`` carries ``usage``, read from ``stream.usage`` once
    the stream is exhausted (see :class:`serving.engine.GenerationStream`).
    """
    cid = id or new_id("chatcmpl")
    ts = created if created is not None else int(time.time())
    for i in range(n):
        yield ChatCompletionChunk(
            id=cid, created=ts, model=model,
            choices=[ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
        )
    for d in stream:
        if not d.text and d.finish_reason is None:
            continue
        yield ChatCompletionChunk(
            id=cid, created=ts, model=model,
            choices=[ChunkChoice(index=d.index, delta=DeltaMessage(content=d.text or None),
                                 finish_reason=d.finish_reason)],
        )
    usage = getattr(stream, "usage", None)
    if include_usage and usage is not None:
        yield ChatCompletionChunk(id=cid, created=ts, model=model, choices=[], usage=_usage(usage))


def completion_chunks(
    stream: Iterable[Delta],
    *,
    model: str,
    include_usage: bool = False,
    id: str | None = None,
    created: int | None = None,
) -> Iterator[Completion]:
    """Streamed ``text_completion`` chunks for a stream (same ``id``/``created`` on each)."""
    cid = id or new_id("cmpl")
    ts = created if created is not None else int(time.time())
    for d in stream:
        if not d.text and d.finish_reason is None:
            continue
        yield Completion(
            id=cid, created=ts, model=model,
            choices=[CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)],
        )
    usage = getattr(stream, "usage", None)
    if include_usage and usage is not None:
        yield Completion(id=cid, created=ts, model=model, choices=[], usage=_usage(usage))


def sse(chunks: Iterable[ChatCompletionChunk | Completion]) -> Iterator[bytes]:
    """Server-sent events: ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]\\n\\n``."""
    for chunk in chunks:
        yield b"data: " + msgspec.json.encode(chunk.to_dict()) + b"\n\n"
    yield b"data: [DONE]\n\n"
