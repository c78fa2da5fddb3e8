"""The adapter archive: a deterministic uncompressed tar, written member by member as the files stream in.

The bytes are those of :mod:`tarfile` in PAX format with mode 0600 and
mtime 0, members in ascending name order, so an archive streamed in from a
worker equals one packed from ``{name: bytes}`` (:func:`pack_files`). A
member's size is written before its content, so it must be known when the
member begins; the content then passes through in chunks, never whole.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any, Protocol

from appliance.errors import InvalidRequestError


class Sink(Protocol):
    def write(self, data: bytes) -> Any: ...


def safe_relative(name: str) -> bool:
    """Whether ``name`` is a relative path without ``..``, empty or hidden parts (an adapter's file)."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") and not p.startswith(".")
                                                           for p in parts)


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, 0
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


class AdapterArchive:
    """Writes an adapter archive into ``sink`` as its members arrive.

    Args:
        sink: Where the tar goes; with ``finish()``/``abort()`` (a blob writer) for :meth:`finish`/:meth:`abort`.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        #: ``{name: size}`` of the members written so far.
        self.sizes: dict[str, int] = {}
        self._offset = 0
        self._member: tuple[str, int] | None = None
        self._written = 0
        self._closed = False

    def _put(self, data: bytes) -> None:
        self.sink.write(data)
        self._offset += len(data)

    def begin(self, name: str, size: int) -> None:
        """Start a member of ``size`` bytes; names must come in ascending order, each once."""
        if self._member is not None or self._closed:
            raise ValueError(f"adapter file {name!r} began while {self._member and self._member[0]!r} was open")
        if not isinstance(name, str) or not safe_relative(name):
            raise ValueError(f"adapter file name {name!r} is not a safe relative path")
        if self.sizes and name <= max(self.sizes):
            raise ValueError(f"adapter file {name!r} came after {max(self.sizes)!r}: files must come in name order")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"adapter file {name!r} needs its size in bytes before its content; got {size!r}")
        self._put(member_header(name, size))
        self._member, self._written = (name, size), 0

    def write(self, data: bytes) -> None:
        if self._member is None:
            raise ValueError("adapter file content outside a member")
        name, size = self._member
        if self._written + len(data) > size:
            raise ValueError(f"adapter file {name!r} overran its size of {size} bytes")
        self._put(data)
        self._written += len(data)

    def end(self) -> None:
        """Close the open member (its content must be complete)."""
        if self._member is None:
            raise ValueError("no adapter file is open")
        name, size = self._member
        if self._written != size:
            raise ValueError(f"adapter file {name!r} ended after {self._written} of its {size} bytes")
        if remainder := size % tarfile.BLOCKSIZE:
            self._put(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))
        self.sizes[name] = size
        self._member = None

    def close(self) -> None:
        """Write the tar's end (two zero blocks, padded to a record)."""
        if self._member is not None:
            raise ValueError(f"adapter file {self._member[0]!r} is still open")
        if not self._closed:
            self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
            if remainder := self._offset % tarfile.RECORDSIZE:
                self._put(tarfile.NUL * (tarfile.RECORDSIZE - remainder))
            self._closed = True

    def add(self, name: str, data: bytes) -> None:
        """One whole member."""
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def finish(self) -> Any:
        """Close the archive and finish the sink (a blob writer's key row)."""
        self.close()
        return self.sink.finish()

    def abort(self) -> None:
        """Discard the archive (the sink's ``abort()``); safe to call more than once."""
        self.sink.abort()


def pack_files(files: dict[str, bytes]) -> bytes:
    """A deterministic uncompressed tar of ``{name: bytes}`` (the adapter directory)."""
    buf = io.BytesIO()
    archive = AdapterArchive(buf)
    for name in sorted(files):
        archive.add(name, files[name])
    archive.close()
    return buf.getvalue()


def unpack_files(data: bytes) -> dict[str, bytes]:
    """The ``{relative path: bytes}`` of an adapter archive (DreamBooth ones have ``unet/...`` paths)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            if not member.isfile() or not safe_relative(member.name):
                raise InvalidRequestError(f"unexpected member {member.name!r} in an adapter archive")
            out[member.name] = tar.extractfile(member).read()
    return out
