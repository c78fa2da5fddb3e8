"""A push-based multipart/form-data reader that never spools to disk.

Litestar's own form parsing rolls uploads over 1 MiB into a temporary file:
plaintext on disk, which the appliance must never write. This reader turns
body chunks into events as they arrive, keeping at most one chunk of file data
in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header

from appliance.errors import InvalidRequestError

MAX_FIELD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Field:
    name: str
    value: str


@dataclass(frozen=True)
class FileStart:
    name: str
    filename: str
    content_type: str


@dataclass(frozen=True)
class FileData:
    data: bytes


@dataclass(frozen=True)
class FileEnd:
    name: str


Event = Field | FileStart | FileData | FileEnd


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or a 400 naming the header."""
    if not content_type:
        raise InvalidRequestError("the request must be multipart/form-data", param="Content-Type")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequestError(
            f"the request must be multipart/form-data with a boundary; got {content_type[:80]!r}",
            param="Content-Type",
        )
    return params[b"boundary"]


class MultipartReader:
    """Feed body chunks with :meth:`feed`; each call returns the events completed so far."""

    def __init__(self, boundary: bytes) -> None:
        self._events: list[Event] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._part: tuple[str, str | None] | None = None  # (name, filename)
        self._field_value = bytearray()
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )
        self.finished = False

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._field_value = bytearray()

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._headers.get("content-disposition")
        if disposition is None:
            raise InvalidRequestError("a multipart part has no Content-Disposition header", param="Content-Disposition")
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self._part = (name, None if filename is None else filename.decode("utf-8", "replace"))
        if filename is not None:
            ctype = self._headers.get("content-type", b"application/octet-stream").decode("latin-1")
            self._events.append(FileStart(name, self._part[1] or "", ctype))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None  # the parser calls headers_finished first  # noqa: S101
        if self._part[1] is not None:
            self._events.append(FileData(bytes(data[start:end])))
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise InvalidRequestError(
                f"form field `{self._part[0]}` is larger than {MAX_FIELD_BYTES} bytes", param=self._part[0]
            )

    def _on_part_end(self) -> None:
        assert self._part is not None  # noqa: S101
        name, filename = self._part
        if filename is not None:
            self._events.append(FileEnd(name))
        else:
            try:
                value = self._field_value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequestError(f"form field `{name}` is not UTF-8", param=name) from None
            self._events.append(Field(name, value))

    def feed(self, chunk: bytes) -> list[Event]:
        try:
            self._parser.write(chunk)
        except InvalidRequestError:
            raise
        except Exception as exc:  # python-multipart raises its own parse errors
            raise InvalidRequestError(f"malformed multipart body: {type(exc).__name__}", param="body") from None
        events, self._events = self._events, []
        return events

    def close(self) -> list[Event]:
        try:
            self._parser.finalize()
        except Exception as exc:
            raise InvalidRequestError(f"malformed multipart body: {type(exc).__name__}", param="body") from None
        events, self._events = self._events, []
        return events
