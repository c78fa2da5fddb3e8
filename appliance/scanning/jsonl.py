"""A streaming JSONL reader that names the line of every problem.

The upload path and ``appliance scan`` share it, so a file is judged the same
way in both. Memory stays bounded by ``max_line_bytes``: the file is never read
whole. Error messages describe the problem, never the line's content.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from appliance.errors import InvalidRequestError
from appliance.scanning.records import require_answer, validate_record

#: Longest line accepted by default; a longer one is almost surely not a record.
MAX_LINE_BYTES = 16 * 1024 * 1024


def parse_line(raw: bytes, line_no: int, *, validate: bool = True,
               answer: bool = False) -> dict[str, Any] | None:
    """One JSONL line (newline optional) as a record; ``None`` for a blank line.

    ``answer``: also require something to train on (:func:`~appliance.scanning.records.require_answer`).

    Raises:
        InvalidRequestError: With ``param`` ``line N`` (or ``line N: <field path>``)
            for a line that is not UTF-8, not JSON, or not a valid record.
    """
    if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"line {line_no} is not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8",
            param=f"line {line_no}",
        ) from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"line {line_no} is not valid JSON: {exc.msg} at column {exc.colno}; "
            "each line must hold exactly one JSON object",
            param=f"line {line_no}",
        ) from None
    except RecursionError:  # ``[[[[...`` deeper than the interpreter's limit
        raise InvalidRequestError(f"line {line_no} is not valid JSON: it is nested too deeply",
                                  param=f"line {line_no}") from None
    if validate:
        try:
            validate_record(record)
            if answer:
                require_answer(record)
        except InvalidRequestError as exc:
            where = f"line {line_no}" if exc.param == "record" else f"line {line_no}: {exc.param}"
            raise InvalidRequestError(f"line {line_no}: {exc.message}", param=where) from None
    return record


def iter_jsonl(
    stream: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES, validate: bool = True
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_no, record)`` for each non-blank line of a JSONL byte stream.

    Line numbers are 1-based. Blank lines are skipped. A UTF-8 byte order mark
    at the start of the file is accepted.

    Args:
        stream: A binary file object (``open(path, "rb")``, an upload body...).
        max_line_bytes: Longest line accepted, newline included.
        validate: Check each record's shape (see :mod:`appliance.scanning.records`).

    Raises:
        InvalidRequestError: With ``param`` ``line N`` (or ``line N: <field path>``)
            for a line that is too long, not UTF-8, not JSON, or not a valid record.
    """
    if max_line_bytes < 1:
        raise ValueError(f"`max_line_bytes` must be positive; got {max_line_bytes!r}")
    line_no = 0
    while True:
        raw = stream.readline(max_line_bytes + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > max_line_bytes:
            raise InvalidRequestError(
                f"line {line_no} is longer than {max_line_bytes} bytes; split the record or check the file",
                param=f"line {line_no}",
            )
        record = parse_line(raw, line_no, validate=validate)
        if record is not None:
            yield line_no, record
