"""The three fine-tune record shapes, their validation and their text fields.

* chat: ``{"messages": [{"role": ..., "content": ...}, ...]}`` where content is
  a string or a list of ``{"type": "text", "text": ...}`` parts;
* completion: ``{"prompt": ..., "completion": ...}``, both strings;
* plain text: ``{"text": ...}``.

Other keys are allowed and ignored: they are neither scanned nor trained on.
Field paths look like ``messages[1].content``, ``messages[1].content[0].text``,
``prompt``, ``completion`` and ``text``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from appliance.errors import InvalidRequestError

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "developer")
_SHAPE_KEYS = ("messages", "prompt", "completion", "text")
_ROLE_LIKE = re.compile(r"^[A-Za-z_-]{1,20}$")


def _kind(value: Any) -> str:
    """A JSON type name for error messages (never the value: it may be sensitive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _fail(path: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=path)


def iter_text_slots(record: Any) -> Iterator[tuple[str, Any, Any]]:
    """``(field_path, container, key)`` for every text field, validating the shape.

    ``container[key]`` is the field's string. Redaction uses the slots to write
    the redacted text back in place; :func:`iter_text_fields` reads them.

    Raises:
        InvalidRequestError: The record is not one of the three shapes; ``param``
            is the path of the offending field (``record`` for the whole record).
    """
    if not isinstance(record, dict):
        raise _fail("record", f"a record must be a JSON object; got {_kind(record)}")
    present = [k for k in _SHAPE_KEYS if k in record]
    if not present:
        raise _fail(
            "record",
            "a record must have `messages` (chat), `prompt` and `completion`, or `text`; got none of them",
        )
    if "messages" in record:
        if len(present) > 1:
            raise _fail("record", f"a chat record must not also have {', '.join(f'`{k}`' for k in present[1:])}")
        yield from _chat_slots(record["messages"])
    elif "text" in record:
        if len(present) > 1:
            raise _fail("record", f"a text record must not also have {', '.join(f'`{k}`' for k in present[:-1])}")
        if not isinstance(record["text"], str):
            raise _fail("text", f"`text` must be a string; got {_kind(record['text'])}")
        yield "text", record, "text"
    else:
        for key in ("prompt", "completion"):
            if key not in record:
                raise _fail(key, f"a completion record needs both `prompt` and `completion`; `{key}` is missing")
            if not isinstance(record[key], str):
                raise _fail(key, f"`{key}` must be a string; got {_kind(record[key])}")
        yield "prompt", record, "prompt"
        yield "completion", record, "completion"


def _chat_slots(messages: Any) -> Iterator[tuple[str, Any, Any]]:
    if not isinstance(messages, list):
        raise _fail("messages", f"`messages` must be an array of message objects; got {_kind(messages)}")
    if not messages:
        raise _fail("messages", "`messages` must contain at least one message; got an empty array")
    for i, message in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(path, f"`{path}` must be an object with `role` and `content`; got {_kind(message)}")
        role = message.get("role")
        if role not in ROLES:
            # Echo the value only when it looks like a role name: it could be anything.
            shown = isinstance(role, str) and _ROLE_LIKE.match(role)
            got = repr(role) if shown else _kind(role) if "role" in message else "nothing"
            raise _fail(f"{path}.role", f"`{path}.role` must be one of {', '.join(ROLES)}; got {got}")
        if "content" not in message:
            raise _fail(f"{path}.content", f"`{path}.content` is missing; it must be a string or an array of text parts")
        content = message["content"]
        if isinstance(content, str):
            yield f"{path}.content", message, "content"
        elif isinstance(content, list):
            for j, part in enumerate(content):
                ppath = f"{path}.content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise _fail(
                        ppath,
                        f'`{ppath}` must be a text part {{"type": "text", "text": "..."}}; '
                        f"got {_kind(part) if not isinstance(part, dict) else 'a part of another type'}",
                    )
                if not isinstance(part.get("text"), str):
                    raise _fail(f"{ppath}.text", f"`{ppath}.text` must be a string; got {_kind(part.get('text'))}")
                yield f"{ppath}.text", part, "text"
        else:
            raise _fail(
                f"{path}.content",
                f"`{path}.content` must be a string or an array of text parts; got {_kind(content)}",
            )


def iter_text_fields(record: Any) -> Iterator[tuple[str, str]]:
    """``(field_path, text)`` for every text field of a fine-tune record.

    Raises:
        InvalidRequestError: The record's shape is wrong; ``param`` names the field.
    """
    for path, container, key in iter_text_slots(record):
        yield path, container[key]


def validate_record(record: Any) -> None:
    """Check a record's shape without scanning it.

    Raises:
        InvalidRequestError: The record's shape is wrong; ``param`` names the field.
    """
    for _ in iter_text_slots(record):
        pass


def require_answer(record: dict[str, Any]) -> None:
    """Check that a fine-tuning record has something to learn: a chat record an ``assistant`` message
    with text, a completion record a non-empty ``completion``. Call after :func:`validate_record`.

    Raises:
        InvalidRequestError: ``param`` ``messages`` or ``completion``.
    """
    if "messages" in record:
        answers = [m for m in record["messages"] if m.get("role") == "assistant"]
        if not answers:
            roles = ", ".join(f"`{r}`" for r in dict.fromkeys(str(m.get("role")) for m in record["messages"]))
            raise _fail("messages", f"a chat record needs an `assistant` message, the answer to train on; "
                                    f"this one has only {roles} messages")
        if not any(_text_of(m.get("content")).strip() for m in answers):
            raise _fail("messages", "a chat record's `assistant` messages are all empty: there is no answer to "
                                    "train on")
    elif "completion" in record and not record["completion"].strip():
        raise _fail("completion", "`completion` is empty: there is no answer to train on")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))
