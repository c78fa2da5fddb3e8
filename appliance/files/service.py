"""Uploads, listing, reading, scan reports and crypto-shredding of files."""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.errors import (
    ApplianceError,
    CrossProjectDenied,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PolicyViolationError,
)
from appliance.files.models import ScanFinding, StoredFile
from appliance.files.multipart import Field, FileData, FileEnd, FileStart, MultipartReader, boundary_of
from appliance.files.images import ImageArchiveIntake, ImageLimits
from appliance.files.pipeline import IntakeReport, JsonlIntake
from appliance.files.policies import PolicyService
from appliance.identity.models import Project
from appliance.identity.service import Principal
from appliance.policy import decide, redact_record
from appliance.scanning import Scanner
from appliance.settings import IntakeSettings
from appliance.storage.blobs import BlobStore, BlobWriter, ShredEvidence

#: Purposes accepted now, with the shape each takes.
PURPOSES = {
    "fine-tune": "JSONL: chat {messages}, {prompt, completion} or {text} per line",
    "fine-tune-images": "a zip of images with optional captions (<image>.txt or metadata.jsonl)",
}
_MULTIPART_OVERHEAD = 1024 * 1024


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class LockedScanner:
    """Serialises scans: one spaCy pipeline shared by concurrent uploads."""

    def __init__(self, scanner: Scanner) -> None:
        self._scanner = scanner
        self._lock = threading.Lock()

    def scan(self, units, *, entities=None):
        with self._lock:
            return self._scanner.scan(units, entities=entities)


@dataclass(frozen=True)
class FileView:
    """A file as the API shows it."""

    row: StoredFile
    project: str


class FileService:
    """The Files API's logic; controllers only translate HTTP.

    Args:
        db: The database.
        blobs: Encrypted storage.
        scanner_factory: Builds the scanner on first use (loading spaCy takes seconds).
        policies: Resolves each project's policy.
        settings: Upload limits.
    """

    def __init__(self, db: Database, blobs: BlobStore, scanner_factory, policies: PolicyService,
                 settings: IntakeSettings) -> None:
        self.db, self.blobs, self.policies, self.settings = db, blobs, policies, settings
        self._scanner_factory = scanner_factory
        #: Called with (file id, audit context) after a file is crypto-shredded.
        self.on_delete: list[Any] = []
        self._scanner: LockedScanner | None = None
        self._scanner_lock = threading.Lock()

    @property
    def scanner(self) -> LockedScanner:
        with self._scanner_lock:
            if self._scanner is None:
                self._scanner = LockedScanner(self._scanner_factory())
            return self._scanner

    # -- projects -----------------------------------------------------------
    def resolve_project(self, principal: Principal, requested: str | None) -> Project:
        """The project an upload or listing acts in.

        Project-scoped tokens act in their own project (naming another answers
        404); global roles must name one with ``OpenAI-Project`` or ``project``.
        """
        if principal.project is not None:
            if requested not in (None, "", principal.project):
                raise CrossProjectDenied(f"project {requested!r} not found", param="project")
            name = principal.project
        else:
            if not requested:
                raise InvalidRequestError(
                    "a global token must name the project: send the `OpenAI-Project` header or a `project` field",
                    param="project",
                )
            name = requested
        with self.db.read() as s:
            project = s.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise NotFoundError(f"project {name!r} not found", param="project")
        return project

    # -- upload -------------------------------------------------------------
    async def upload(
        self,
        principal: Principal,
        ctx: AuditContext,
        headers: Mapping[str, str],
        body: AsyncIterator[bytes],
    ) -> FileView:
        """Stream a multipart upload through the intake pipeline into encrypted storage.

        Nothing of a rejected upload is kept; the rejection is audited.
        """
        limit = self.settings.max_upload_bytes
        writer: BlobWriter | None = None
        state: dict[str, Any] = {"purpose": None, "project": None, "filename": None}
        try:
            declared = headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit + _MULTIPART_OVERHEAD:
                raise PayloadTooLargeError(f"upload of {declared} bytes is over the {limit}-byte limit", param="file")
            reader = MultipartReader(boundary_of(headers.get("content-type")))
            fields: dict[str, str] = {}
            intake: JsonlIntake | ImageArchiveIntake | None = None
            file_done, received = False, 0
            async for chunk in body:
                received += len(chunk)
                if received > limit + _MULTIPART_OVERHEAD:
                    raise PayloadTooLargeError(f"upload is over the {limit}-byte limit", param="file")
                pending = bytearray()
                for event in reader.feed(chunk):
                    if isinstance(event, Field):
                        fields[event.name] = event.value
                    elif isinstance(event, FileStart):
                        if event.name != "file" or intake is not None:
                            raise InvalidRequestError(
                                f"expected exactly one file part named `file`; got a file part named `{event.name}`",
                                param=event.name,
                            )
                        purpose = self._check_purpose(fields.get("purpose"))
                        project = self.resolve_project(principal, headers.get("openai-project") or fields.get("project"))
                        state.update(purpose=purpose, project=project, filename=event.filename)
                        policy = self.policies.effective(project)
                        state["policy"] = policy
                        state["file_id"] = new_file_id()
                        writer = self.blobs.create(state["file_id"], project.name, "file")
                        if purpose == "fine-tune-images":
                            intake = ImageArchiveIntake(
                                writer, self.scanner, policy, instance_prompt=fields.get("instance_prompt"),
                                limits=ImageLimits(max_archive_bytes=min(limit, self.settings.max_image_archive_bytes)),
                                max_findings=self.settings.max_findings,
                            )
                        else:
                            intake = JsonlIntake(
                                writer, self.scanner, policy, max_line_bytes=self.settings.max_line_bytes,
                                max_findings=self.settings.max_findings,
                            )
                    elif isinstance(event, FileData):
                        pending += event.data
                    elif isinstance(event, FileEnd):
                        file_done = True
                if pending and intake is not None:
                    if intake.report.original_bytes + len(pending) > limit:
                        raise PayloadTooLargeError(f"file is over the {limit}-byte limit", param="file")
                    await to_thread.run_sync(intake.feed, bytes(pending))
            reader.close()
            if intake is None:
                if "purpose" not in fields:
                    raise InvalidRequestError("missing form field `purpose`", param="purpose")
                raise InvalidRequestError("missing file part `file`", param="file")
            if not file_done:
                raise InvalidRequestError("the upload ended before the file was complete", param="file")
            report = await to_thread.run_sync(intake.close)
            if report.blocked:
                raise PolicyViolationError(_blocked_message(report), param="file",
                                           details=report.summary(state["policy"]) | {"blocked_lines": report.blocked_lines})
            filename = await to_thread.run_sync(self._clean_filename, state["filename"] or "upload.jsonl", state["policy"])
            key_row = writer.finish()
            try:
                return await to_thread.run_sync(self._commit, ctx, principal, state, filename, report, key_row)
            except BaseException:
                writer.abort()
                raise
        except ApplianceError as exc:
            if writer is not None:
                writer.abort()
            await to_thread.run_sync(self._audit_rejection, ctx, state, exc)
            raise
        except BaseException:
            if writer is not None:
                writer.abort()
            raise

    def _check_purpose(self, purpose: str | None) -> str:
        if purpose is None:
            raise InvalidRequestError("missing form field `purpose` (it must come before the file)", param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequestError(
                f"`purpose` must be one of {', '.join(sorted(PURPOSES))}; got {purpose!r}", param="purpose"
            )
        return purpose

    def _clean_filename(self, filename: str, policy) -> str:
        """The file name as stored: personal data or secrets in it are redacted."""
        name = filename.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload.jsonl"
        stem, dot, ext = name.rpartition(".")
        if not dot or len(ext) > 8:
            stem, dot, ext = name, "", ""
        found = self.scanner.scan([(0, "text", stem)], entities=policy.scanned_entities())
        findings = decide(found, policy).findings
        if not findings:
            return name
        # Whatever the policy says for file contents, a name is only shown: hide it.
        redacted = redact_record({"text": stem}, [dataclasses.replace(f, action="redact") for f in findings])["text"]
        return redacted + dot + ext

    def _commit(self, ctx: AuditContext, principal: Principal, state: dict[str, Any], filename: str,
                report: IntakeReport, key_row) -> FileView:
        project, policy = state["project"], state["policy"]
        with self.db.transaction() as s:
            row = StoredFile(
                id=state["file_id"], project_id=project.id, filename=filename, purpose=state["purpose"],
                bytes=report.stored_bytes, original_bytes=report.original_bytes, records=report.records,
                status="processed", created_by=principal.user, content_sha256=report.content_sha256,
                policy_hash=policy.content_hash, decision="accepted", scan_summary=report.summary(policy),
            )
            s.add(key_row)
            s.add(row)
            s.flush()
            s.add_all(
                ScanFinding(file_id=row.id, record=f.record, field=f.field, entity_type=f.entity_type,
                            start=f.start, end=f.end, score=round(float(f.score), 4), action=f.action,
                            **_stored_location(report.stored_spans.get(i)))
                for i, f in enumerate(report.findings)
            )
            record(
                s, ctx, "file.upload", resource_type="file", resource_id=row.id, project=project.name,
                details={"purpose": row.purpose, "bytes": row.bytes, "records": row.records,
                         "policy_hash": policy.content_hash, "by_entity_type": dict(report.by_type),
                         "by_action": dict(report.by_action), "kek_id": key_row.kek_id},
            )
        return FileView(row, project.name)

    def _audit_rejection(self, ctx: AuditContext, state: dict[str, Any], exc: ApplianceError) -> None:
        project = state.get("project")
        details: dict[str, Any] = {"code": exc.code, "param": exc.param, "purpose": state.get("purpose")}
        if isinstance(exc, PolicyViolationError):
            details.update(exc.details or {})
        with self.db.transaction() as s:
            record(
                s, ctx, "file.reject", outcome="denied" if isinstance(exc, PolicyViolationError) else "failure",
                resource_type="file", project=project.name if project else None, reason=exc.message[:500],
                details=details,
            )

    # -- reading ------------------------------------------------------------
    def _get(self, principal: Principal, file_id: str) -> FileView:
        with self.db.read() as s:
            row = s.get(StoredFile, file_id)
            project = s.get(Project, row.project_id) if row is not None else None
        if row is None or row.deleted_at is not None:
            raise NotFoundError(f"file {file_id!r} not found", param="file_id")
        principal.check_project(row.project_id, resource=f"file {file_id!r}")
        return FileView(row, project.name)

    def get(self, principal: Principal, file_id: str) -> FileView:
        return self._get(principal, file_id)

    def list(self, principal: Principal, *, project: str | None, purpose: str | None, after: str | None,
             limit: int, order: str) -> tuple[list[FileView], bool]:
        with self.db.read() as s:
            stmt = select(StoredFile, Project.name).join(Project, Project.id == StoredFile.project_id).where(
                StoredFile.deleted_at.is_(None)
            )
            if principal.project_id is not None:
                if project not in (None, "", principal.project):
                    # Named another project: refused like upload does, never quietly answered with our own.
                    raise CrossProjectDenied(f"project {project!r} not found", param="project")
                stmt = stmt.where(StoredFile.project_id == principal.project_id)
            elif project:
                stmt = stmt.where(Project.name == project)
            if purpose:
                stmt = stmt.where(StoredFile.purpose == purpose)
            desc = order == "desc"
            if after:
                anchor = s.get(StoredFile, after)
                if anchor is not None:
                    cmp = (StoredFile.created_at, StoredFile.id)
                    key = (anchor.created_at, anchor.id)
                    from sqlalchemy import tuple_

                    stmt = stmt.where(tuple_(*cmp) < key if desc else tuple_(*cmp) > key)
            ordering = (StoredFile.created_at.desc(), StoredFile.id.desc()) if desc else (
                StoredFile.created_at, StoredFile.id)
            rows = s.execute(stmt.order_by(*ordering).limit(limit + 1)).all()
        views = [FileView(r, p) for r, p in rows[:limit]]
        return views, len(rows) > limit

    def content(self, principal: Principal, ctx: AuditContext, file_id: str) -> tuple[FileView, Iterator[bytes]]:
        """Decrypted content; the read is audited before the first byte leaves."""
        view = self._get(principal, file_id)
        with self.db.transaction() as s:
            chunks = self.blobs.read(s, file_id)
            first = next(chunks, b"")  # authenticate the first segment before auditing success
            record(s, ctx, "file.read_content", resource_type="file", resource_id=file_id, project=view.project,
                   details={"bytes": view.row.bytes})

        def stream() -> Iterator[bytes]:
            yield first
            yield from chunks

        return view, stream()

    def scan_report(self, principal: Principal, file_id: str) -> tuple[FileView, list[ScanFinding]]:
        view = self._get(principal, file_id)
        with self.db.read() as s:
            findings = list(s.scalars(
                select(ScanFinding).where(ScanFinding.file_id == file_id).order_by(ScanFinding.record, ScanFinding.id)
            ))
        return view, findings

    def delete(self, principal: Principal, ctx: AuditContext, file_id: str) -> FileView:
        """Crypto-shred: destroy the data key, remove the blob, hide the file."""
        view = self._get(principal, file_id)
        with self.db.transaction() as s:
            row = s.get(StoredFile, file_id, with_for_update=True)  # two deletes at once: one shreds
            if row.deleted_at is not None:
                raise NotFoundError(f"file {file_id!r} not found", param="file_id")
            self.shred(s, ctx, row, view.project)
        self.finish_shred(file_id, ctx)
        return view

    def shred(self, s: Session, ctx: AuditContext, row: StoredFile, project: str, *, reason: str | None = None,
              details: dict[str, Any] | None = None) -> ShredEvidence:
        """The transactional half of every deletion, on a row the caller locked in ``s``.

        Hides the file, destroys its data key, drops its findings and audits
        ``file.delete`` (with ``reason`` and extra ``details``) in the same
        transaction. Call :meth:`finish_shred` once it has committed.
        """
        row.deleted_at = utcnow()
        evidence = self.blobs.shred(s, row.id)
        s.query(ScanFinding).filter(ScanFinding.file_id == row.id).delete()
        record(s, ctx, "file.delete", resource_type="file", resource_id=row.id, project=project, reason=reason,
               details={**(details or {}), "crypto_shred": {"kek_id": evidence.kek_id,
                                                            "key_destroyed_at": evidence.shredded_at.isoformat()}})
        return evidence

    def finish_shred(self, file_id: str, ctx: AuditContext) -> None:
        """After a deletion committed: remove the ciphertext and run :attr:`on_delete` (adapter withdrawal)."""
        self.blobs.remove(file_id)  # after the commit: the key is gone either way
        for hook in self.on_delete:
            hook(file_id, ctx)


def _blocked_message(report: IntakeReport) -> str:
    parts = []
    for entity, lines in sorted(report.blocked_lines.items()):
        shown = ", ".join(map(str, lines))
        more = " and more" if len(lines) >= 20 else ""
        parts.append(f"{entity} on line{'s' if len(lines) > 1 else ''} {shown}{more}")
    return "file rejected by the project's policy: " + "; ".join(parts)


def _stored_location(span: tuple[int, int, int] | None) -> dict[str, int | None]:
    record, start, end = span if span is not None else (None, None, None)
    return {"stored_record": record, "stored_start": start, "stored_end": end}
