"""A project's reviewed glossary: values its data owners marked as not personal data.

Codenames, product and team names look like people to any name detector.
After reviewing a file's scan report (grouped by value), a data owner marks
such values; they join the project's policy as allow-list entries
(:meth:`appliance.policy.Policy.with_allowed`) for every later upload, every
re-scan and the output guard of the project's models.

The values are customer data, so the glossary is stored encrypted: one
blob-store object per revision (a small JSON document), the previous one
crypto-shredded when a new one is committed. Audit events carry counts and the
glossary's content hash, never the values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.errors import ConflictError, InvalidRequestError, NotFoundError
from appliance.policy.model import MAX_ALLOW_LIST, MAX_ALLOWED_VALUE_CHARS, normalize_allowed
from appliance.policy.models import ProjectGlossary
from appliance.storage.blobs import BlobStore

if TYPE_CHECKING:
    from appliance.identity.models import Project

FORMAT = "appliance-glossary/1"


@dataclass(frozen=True)
class GlossaryEntry:
    """One reviewed value."""

    id: str
    value: str
    #: What the scanner took it for (``PERSON``, ``LOCATION``...), or ``None`` when added by hand.
    entity_type: str | None
    #: The file whose review added it, if any.
    file_id: str | None
    added_by: str
    added_at: int


@dataclass(frozen=True)
class Glossary:
    entries: tuple[GlossaryEntry, ...]
    content_hash: str
    #: The encrypted document this was read from (``None``: no glossary yet).
    object_id: str | None = None

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(e.value for e in self.entries)


EMPTY = Glossary((), "")


class _Stale(Exception):
    """Another writer changed the glossary between our read and our commit."""


def glossary_hash(values) -> str:
    canonical = json.dumps(sorted({normalize_allowed(v) for v in values}), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def check_value(value: object, param: str) -> str:
    """A value as accepted into the glossary, or a 400 naming ``param``."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{param}: must be a non-empty string", param=param)
    value = " ".join(value.split())
    if len(value) > MAX_ALLOWED_VALUE_CHARS:
        raise InvalidRequestError(f"{param}: at most {MAX_ALLOWED_VALUE_CHARS} characters; got {len(value)}",
                                  param=param)
    return value


class _Replaced(Exception):
    """The document a reader found in the table was removed before it read it."""

    def __init__(self, object_id: str) -> None:
        super().__init__(object_id)
        self.object_id = object_id


@contextlib.contextmanager
def _first_insert_races_are_stale() -> Iterator[None]:
    """Two first additions at once: the one whose insert loses retries, like any other stale write."""
    try:
        yield
    except IntegrityError:
        raise _Stale from None


class GlossaryService:
    """Reads and changes project glossaries.

    Args:
        db: The database.
        blobs: Encrypted storage of the glossary documents.
    """

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db, self.blobs = db, blobs
        self._cache: dict[str, Glossary] = {}  # object id -> decrypted document
        self._lock = threading.Lock()

    def get(self, project: Project) -> Glossary:
        seen: str | None = None
        while True:
            try:
                return self._get(project)
            except _Replaced as replaced:
                # A writer committed a newer document and removed this one between our reading the row and
                # the blob: read again. The same object missing twice is not a race but a lost file.
                if replaced.object_id == seen:
                    raise replaced.__cause__ from None
                seen = replaced.object_id

    def _get(self, project: Project) -> Glossary:
        with self.db.read() as s:
            row = s.get(ProjectGlossary, project.id)
            if row is None:
                return EMPTY
            cached = self._cache.get(row.object_id)
            if cached is not None:
                return cached
            try:
                data = b"".join(self.blobs.read(s, row.object_id))
            except (FileNotFoundError, NotFoundError) as exc:
                # SQLite's reader still sees the old key but the file is gone; PostgreSQL's (read committed)
                # already sees the key shredded.
                raise _Replaced(row.object_id) from exc
        doc = json.loads(data)
        glossary = Glossary(tuple(GlossaryEntry(**e) for e in doc["entries"]), row.content_hash, row.object_id)
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[row.object_id] = glossary
        return glossary

    def add(self, ctx: AuditContext, project: Project, values: list[tuple[str, str | None]], *,
            file_id: str | None = None) -> tuple[Glossary, int]:
        """Add ``(value, entity_type)`` pairs; values already present are skipped. Returns (glossary, added)."""
        for _ in range(20):  # each retry follows a commit of someone else
            try:
                return self._add(ctx, project, values, file_id)
            except _Stale:
                continue
        raise ConflictError("the glossary is being changed by others: try again", param="values")

    def _add(self, ctx: AuditContext, project: Project, values: list[tuple[str, str | None]],
             file_id: str | None) -> tuple[Glossary, int]:
        current = self.get(project)
        seen = {normalize_allowed(e.value) for e in current.entries}
        now = int(utcnow().timestamp())
        new = []
        for value, etype in values:
            key = normalize_allowed(value)
            if key in seen:
                continue
            seen.add(key)
            new.append(GlossaryEntry(f"gle_{secrets.token_hex(6)}", value, etype, file_id, ctx.actor, now))
        if len(current.entries) + len(new) > MAX_ALLOW_LIST:
            raise InvalidRequestError(f"a glossary holds at most {MAX_ALLOW_LIST} values; this would make it "
                                      f"{len(current.entries) + len(new)}", param="values")
        if not new:
            return current, 0
        glossary = self._store(ctx, project, current, (*current.entries, *new), "glossary.add",
                               {"added": len(new), "file_id": file_id})
        return glossary, len(new)

    def remove(self, ctx: AuditContext, project: Project, entry_id: str) -> Glossary:
        for _ in range(20):  # each retry follows a commit of someone else
            try:
                return self._remove(ctx, project, entry_id)
            except _Stale:
                continue
        raise ConflictError("the glossary is being changed by others: try again", param="entry_id")

    def _remove(self, ctx: AuditContext, project: Project, entry_id: str) -> Glossary:
        current = self.get(project)
        kept = tuple(e for e in current.entries if e.id != entry_id)
        if len(kept) == len(current.entries):
            raise NotFoundError(f"glossary entry {entry_id!r} not found in project {project.name!r}",
                                param="entry_id")
        return self._store(ctx, project, current, kept, "glossary.remove", {"removed": 1, "entry_id": entry_id})

    def _store(self, ctx: AuditContext, project: Project, read: Glossary, entries: tuple[GlossaryEntry, ...],
               action: str, details: dict) -> Glossary:
        object_id = f"glossary-{secrets.token_hex(12)}"
        doc = {"format": FORMAT, "project": project.name, "entries": [asdict(e) for e in entries]}
        content_hash = glossary_hash(e.value for e in entries)
        old: str | None = None
        with self.blobs.writing(object_id, project.name, "glossary") as writer:
            writer.write(json.dumps(doc, ensure_ascii=False).encode())
            key_row = writer.finish()
            with _first_insert_races_are_stale(), self.db.transaction() as s:
                row = s.get(ProjectGlossary, project.id, with_for_update=True)
                if (row.object_id if row else None) != read.object_id:
                    raise _Stale
                previous = row.content_hash if row else None
                s.add(key_row)
                if row is None:
                    s.add(ProjectGlossary(project_id=project.id, object_id=object_id, entries=len(entries),
                                          content_hash=content_hash, updated_by=ctx.actor))
                else:
                    old = row.object_id
                    self.blobs.shred(s, old)
                    row.object_id, row.entries, row.content_hash = object_id, len(entries), content_hash
                    row.updated_by, row.updated_at = ctx.actor, utcnow()
                record(s, ctx, action, resource_type="glossary", resource_id=project.name, project=project.name,
                       details={**details, "entries": len(entries), "content_hash": content_hash,
                                "previous_hash": previous, "object_id": object_id})
        glossary = Glossary(entries, content_hash, object_id)
        with self._lock:
            self._cache[object_id] = glossary
            if old is not None:
                self._cache.pop(old, None)  # shredded: its values leave this process's memory too
        if old is not None:
            self.blobs.remove(old)
        return glossary
