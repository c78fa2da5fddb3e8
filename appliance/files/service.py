"""Uploads, listing, reading, scan reports and crypto-shredding of files."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import random
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from appliance.audit.service import AuditContext, latest_events, record
from appliance.db.base import Database, created_before, utcnow
from appliance.errors import (
    MODEL_NAME_LIKE,
    ApplianceError,
    ConflictError,
    CrossProjectDenied,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PolicyViolationError,
    echo,
)
from appliance.files.models import ScanFinding, StoredFile
from appliance.files.multipart import Field, FileData, FileEnd, FileStart, MultipartReader, boundary_of
from appliance.files.images import ImageArchiveIntake, ImageLimits
from appliance.files.pipeline import IntakeReport, JsonlIntake
from appliance.files.quality import QualityPass, TokenCounter, leakage, load_sketch
from appliance.identity.roles import Permission, role_allows
from appliance.identity.service import Principal, project_by_id, project_named, project_names
from appliance.policy import decide, redact_record
from appliance.policy.glossary import check_value
from appliance.policy.model import normalize_allowed
from appliance.policy.service import PolicyService
from appliance.scanning import Scanner, iter_text_fields, parse_line
from appliance.scanning.findings import SECRET_ENTITIES
from appliance.settings import IntakeSettings
from appliance.storage.blobs import BlobStore, BlobWriter, ShredEvidence

log = logging.getLogger("appliance.files")

if TYPE_CHECKING:
    from appliance.identity.models import Project

#: Purposes accepted now, with the shape each takes.
PURPOSES = {
    "fine-tune": "JSONL: chat {messages}, {prompt, completion} or {text} per line",
    "fine-tune-images": "a zip of images with optional captions (<image>.txt or metadata.jsonl)",
    "evals": "JSONL test file for evaluations, in fine-tune's shapes; never used for training",
}
#: Purposes whose kept original may be re-scanned under the project's current policy (the JSONL ones).
RESCANNABLE = frozenset({"fine-tune", "evals"})
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
        #: ``(session, audit context, file_id)``, called inside the transaction that shreds a file (a user's
        #: deletion, retention), after its ``file.delete`` event: what holds a copy of its content goes with it in
        #: that transaction (the evaluations package registers its result files; wired in
        #: :mod:`appliance.server.state`).
        self.on_shred: list[Callable[[Session, AuditContext, str], None]] = []
        #: ``(session, file_id) -> job or evaluation id | None``: who may still read a file (the jobs and evaluations
        #: packages register their unfinished ones; wired in :mod:`appliance.server.state`), asked in the caller's
        #: transaction.
        self.users_of: list[Callable[[Session, str], str | None]] = []
        #: ``() -> rows`` of the imported base models (``name``, ``kind``, ``path``, ``info``), oldest first: the
        #: catalogue registers it (wired in :mod:`appliance.server.state`); the quality report counts tokens with one.
        self.base_models: Callable[[], list[Any]] = list
        self._scanner: LockedScanner | None = None
        self._scanner_lock = threading.Lock()
        self._token_counters: dict[str, TokenCounter] = {}

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
            project = project_named(s, name)
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
        original: BlobWriter | None = None
        sketch: BlobWriter | None = None
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
                            quality = await to_thread.run_sync(self.quality_pass, fields.get("model"),
                                                               fields.get("max_seq_length"))
                            intake = JsonlIntake(
                                writer, self.scanner, policy, max_line_bytes=self.settings.max_line_bytes,
                                max_findings=self.settings.max_findings, quality=quality,
                            )
                            if self.settings.keep_originals:
                                # Kept for review and re-scanning, encrypted under its own key, shredded
                                # with the file; workers never receive it.
                                original = self.blobs.create(original_id(state["file_id"]), project.name,
                                                             "file-original")
                    elif isinstance(event, FileData):
                        pending += event.data
                    elif isinstance(event, FileEnd):
                        file_done = True
                if pending and intake is not None:
                    if intake.report.original_bytes + len(pending) > limit:
                        raise PayloadTooLargeError(f"file is over the {limit}-byte limit", param="file")
                    data = bytes(pending)
                    await to_thread.run_sync(intake.feed, data)
                    if original is not None:
                        await to_thread.run_sync(original.write, data)
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
            _check_quality(report, state["policy"], "file rejected")
            filename = await to_thread.run_sync(self._clean_filename, state["filename"] or "upload.jsonl", state["policy"])
            key_rows = [writer.finish()]
            if original is not None:
                key_rows.append(original.finish())
            if isinstance(intake, JsonlIntake) and intake.quality is not None:
                sketch = self.blobs.create(quality_id(state["file_id"]), state["project"].name, "file-quality")
                key_rows.append(await to_thread.run_sync(_write_sketch, sketch, intake.quality, report))
            return await to_thread.run_sync(self._commit, ctx, principal, state, filename, report, key_rows)
        except ApplianceError as exc:
            for w in (writer, original, sketch):
                if w is not None:
                    w.abort()
            await to_thread.run_sync(self._audit_rejection, ctx, state, exc)
            raise
        except BaseException:
            for w in (writer, original, sketch):
                if w is not None:
                    w.abort()
            raise

    def _check_purpose(self, purpose: str | None) -> str:
        if purpose is None:
            raise InvalidRequestError("missing form field `purpose` (it must come before the file)", param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequestError(
                f"`purpose` must be one of {', '.join(sorted(PURPOSES))}; got {purpose!r}", param="purpose"
            )
        return purpose

    def quality_pass(self, model: str | None, max_seq_length: Any, *, strict: bool = True) -> QualityPass:
        """The quality pass of an upload (:mod:`appliance.files.quality`).

        Tokens are counted with ``model``'s tokenizer, by default the first imported text base model's;
        without one the report counts characters and says why. ``max_seq_length`` defaults to the
        jobs' ``auto`` (2048 or the model's context, whichever is less).

        Raises:
            InvalidRequestError: ``model`` names no imported text base model, or ``max_seq_length`` is not a
                positive whole number (with ``strict``; else the report says so).
        """
        limit = None
        if max_seq_length not in (None, ""):
            text = str(max_seq_length).strip()
            if not text.isdigit() or not 0 < int(text) <= 1_048_576:
                raise InvalidRequestError(f"`max_seq_length` must be a whole number of tokens from 1 to 1048576; "
                                          f"got {echo(text, MODEL_NAME_LIKE)}", param="max_seq_length")
            limit = int(text)
        rows = [r for r in self.base_models() if r.kind == "llm"]
        if model:
            row = next((r for r in rows if r.name == model), None)
            if row is None:
                if strict:
                    raise InvalidRequestError(f"`model` {echo(model, MODEL_NAME_LIKE)} is not an imported text base "
                                              "model; see GET /v1/models, or leave `model` out for the first "
                                              "imported one", param="model")
                return QualityPass(max_seq_length=limit,
                                   tokenizer_note=f"model {echo(model, MODEL_NAME_LIKE)} is no longer imported")
        elif rows:
            row = rows[0]
        else:
            return QualityPass(max_seq_length=limit, tokenizer_note="no text base model is imported")
        try:
            counter = self._token_counter(row)
        except Exception as exc:  # noqa: BLE001 - the report says so and counts characters
            log.warning("could not load a tokenizer for the quality report",
                        extra={"model": row.name, "exception": type(exc).__name__})
            return QualityPass(max_seq_length=limit,
                               tokenizer_note=f"the tokenizer of {row.name!r} could not be loaded")
        return QualityPass(tokens=counter, max_seq_length=limit)

    def _token_counter(self, row: Any) -> TokenCounter:
        key = f"{row.name}|{row.path}"
        with self._scanner_lock:
            counter = self._token_counters.get(key)
        if counter is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(row.path, local_files_only=True)
            counter = TokenCounter(row.name, tokenizer, (row.info or {}).get("context_length"))
            with self._scanner_lock:
                self._token_counters[key] = counter
        return counter

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
                report: IntakeReport, key_rows: list) -> FileView:
        project, policy = state["project"], state["policy"]
        with self.db.transaction() as s:
            row = StoredFile(
                id=state["file_id"], project_id=project.id, filename=filename, purpose=state["purpose"],
                bytes=report.stored_bytes, original_bytes=report.original_bytes, records=report.records,
                status="processed", created_by=principal.user, content_sha256=report.content_sha256,
                policy_hash=policy.content_hash, decision="accepted", scan_summary=report.summary(policy),
                original_id=next((k.object_id for k in key_rows if k.kind == "file-original"), None), revision=1,
            )
            s.add_all(key_rows)
            s.add(row)
            s.flush()
            _add_findings(s, row.id, report)
            record(
                s, ctx, "file.upload", resource_type="file", resource_id=row.id, project=project.name,
                details={"purpose": row.purpose, "bytes": row.bytes, "records": row.records,
                         "policy_hash": policy.content_hash, "by_entity_type": dict(report.by_type),
                         "by_action": dict(report.by_action), "kek_id": key_rows[0].kek_id,
                         "original_kept": row.original_id is not None},
            )
        return FileView(row, project.name)

    def _audit_rejection(self, ctx: AuditContext, state: dict[str, Any], exc: ApplianceError, *,
                         action: str = "file.reject", file_id: str | None = None) -> None:
        project = state.get("project")
        details: dict[str, Any] = {"code": exc.code, "param": exc.param, "purpose": state.get("purpose")}
        if state.get("filename") and state.get("policy") is not None:
            try:  # the name as it would have been stored (personal data in it redacted), for the owner's list
                details["filename"] = self._clean_filename(state["filename"], state["policy"])
            except Exception as err:  # noqa: BLE001 - the rejection is recorded without it
                # Its type only: a traceback's message might quote the very name being cleaned.
                log.warning("could not clean a rejected upload's file name", extra={"exception": type(err).__name__})
        if isinstance(exc, PolicyViolationError):
            details.update(exc.details or {})
        with self.db.transaction() as s:
            record(
                s, ctx, action, outcome="denied" if isinstance(exc, PolicyViolationError) else "failure",
                resource_type="file", resource_id=file_id, project=project.name if project else None,
                reason=exc.message[:500], details=details,
            )

    def rejections(self, principal: Principal, limit: int = 50) -> list[dict[str, Any]]:
        """The caller's own refused uploads in its project, newest first, with the reason (from the audit log).

        A refused upload keeps nothing of its content; this is what its owner may still see: when, the
        file name as it would have been stored, the purpose, and the error (code, field or line, message;
        for a policy block, the entity types and lines).
        """
        with self.db.read() as s:
            events = latest_events(s, action="file.reject", actor=principal.user, project=principal.project,
                                   limit=limit)
        return [{"rejected_at": int(e.ts.timestamp()), "filename": e.details.get("filename"),
                 "purpose": e.details.get("purpose"), "project": e.project, "code": e.details.get("code"),
                 "param": e.details.get("param"), "message": e.reason or "",
                 "by_entity_type": e.details.get("by_entity_type") or {},
                 "blocked_lines": e.details.get("blocked_lines") or {}} for e in events]

    # -- reading ------------------------------------------------------------
    def _get(self, principal: Principal, file_id: str) -> FileView:
        with self.db.read() as s:
            row = s.get(StoredFile, file_id)
            project = project_by_id(s, row.project_id) if row is not None else None
        if row is None or row.deleted_at is not None:
            raise NotFoundError(f"file {file_id!r} not found", param="file_id")
        principal.check_project(row.project_id, resource=f"file {file_id!r}")
        return FileView(row, project.name)

    def get(self, principal: Principal, file_id: str) -> FileView:
        return self._get(principal, file_id)

    def project_of(self, view: FileView) -> Project:
        with self.db.read() as s:
            return project_by_id(s, view.row.project_id)

    def list(self, principal: Principal, *, project: str | None, purpose: str | None, after: str | None,
             limit: int, order: str) -> tuple[list[FileView], bool]:
        with self.db.read() as s:
            stmt = select(StoredFile).where(StoredFile.deleted_at.is_(None))
            if principal.project_id is not None:
                if project not in (None, "", principal.project):
                    # Named another project: refused like upload does, never quietly answered with our own.
                    raise CrossProjectDenied(f"project {project!r} not found", param="project")
                stmt = stmt.where(StoredFile.project_id == principal.project_id)
            elif project:
                named = project_named(s, project)
                stmt = stmt.where(StoredFile.project_id == (named.id if named is not None else None))
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
            rows = list(s.scalars(stmt.order_by(*ordering).limit(limit + 1)))
            names = project_names(s, {r.project_id for r in rows})
        views = [FileView(r, names[r.project_id]) for r in rows[:limit]]
        return views, len(rows) > limit

    def content(self, principal: Principal, ctx: AuditContext, file_id: str) -> tuple[FileView, Iterator[bytes]]:
        """Decrypted content; the read is audited before the first byte leaves."""
        view = self._get(principal, file_id)
        with self.db.transaction() as s:
            chunks = self.blobs.read(s, view.row.content_object)
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

    def stored_records(self, principal: Principal, ctx: AuditContext, file_id: str,
                       wanted: set[int]) -> dict[int, dict[str, Any]]:
        """The stored (policy-redacted) records at indices ``wanted``, parsed; the read is audited.

        Streams the stored content and keeps only the wanted records, so any record of a large
        file can be shown without holding the file.
        """
        _, chunks = self.content(principal, ctx, file_id)
        out: dict[int, dict[str, Any]] = {}
        for index, raw in _lines_of(chunks):
            if index in wanted:
                parsed = parse_line(raw, index + 1, validate=False)
                if parsed is not None:
                    out[index] = parsed
                if len(out) == len(wanted):
                    break
        return out

    # -- review -------------------------------------------------------------
    def scan_groups(self, principal: Principal, ctx: AuditContext | None, file_id: str, *,
                    reveal: bool) -> tuple[FileView, list[FindingGroup]]:
        """The file's findings grouped by distinct value (case and spacing aside).

        Each group has a stable id (an HMAC of the value under a key of the
        file's original, so it names the value without showing it), counts,
        types, the highest score and the actions taken. With ``reveal`` (data
        owners: ``files:content``) the value and up to three contexts, where
        other findings show as ``<TYPE>``, are included and the read is audited
        (unless ``ctx`` is ``None``: values read to add them to the glossary,
        which audits that instead).
        """
        view = self._get(principal, file_id)
        row = view.row
        if reveal and not role_allows(principal.role, Permission.FILES_CONTENT):
            raise PermissionDeniedError(f"role {principal.role.value!r} may not reveal scanned values "
                                        f"({Permission.FILES_CONTENT.value!r} needed)", param="reveal")
        if row.original_id is None:
            raise ConflictError(f"file {file_id!r} has no kept original, so its findings cannot be grouped by "
                                "value: upload it again", param="file_id")
        with self.db.read() as s:
            findings = list(s.scalars(select(ScanFinding).where(ScanFinding.file_id == file_id)
                                      .order_by(ScanFinding.record, ScanFinding.field, ScanFinding.start)))
            secret = self.blobs.derive_secret(s, row.original_id, "review-groups")
            chunks = self.blobs.read(s, row.original_id)
        groups: dict[str, FindingGroup] = {}
        by_field: dict[tuple[int, str], list[ScanFinding]] = {}
        for f in findings:
            by_field.setdefault((f.record, f.field), []).append(f)
        for (record_index, path), text in _texts_of(chunks, {k[0] for k in by_field}):
            in_field = by_field.get((record_index, path), [])
            for f in in_field:
                value = text[f.start:f.end]
                key = normalize_allowed(value)
                gid = "grp_" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:20]
                group = groups.get(gid)
                if group is None:
                    group = groups[gid] = FindingGroup(id=gid, value=value)
                group.add(f, record_index)
                if reveal and not group.secret and len(group.contexts) < 3:
                    group.contexts.append(_context(text, f, in_field))
        ordered = sorted(groups.values(), key=lambda g: (-g.count, g.id))
        with self.db.read() as s:
            policy = self.policies.effective(project_by_id(s, row.project_id))
        for g in ordered:
            g.allowed = bool(policy.allowed_spans(g.value))
        if reveal and ctx is not None:
            with self.db.transaction() as s:
                record(s, ctx, "file.scan_reveal", resource_type="file", resource_id=file_id, project=view.project,
                       details={"groups": len(ordered), "findings": len(findings)})
        return view, ordered

    def quality(self, principal: Principal, ctx: AuditContext, file_id: str, *, reveal: bool = False,
                compare: str | None = None) -> tuple[FileView, dict[str, Any], dict[str, Any] | None,
                                                     dict[str, Any] | None]:
        """The file's quality report; with ``reveal`` the duplicate examples' stored text; with ``compare``
        (a validation or test file of the same project) the leakage between the two.

        Returns ``(view, report, examples, leakage)``. ``reveal`` needs ``files:content`` and is audited
        (``file.quality_reveal``, before the stored, already redacted, records are returned);
        the leakage compares the two files' encrypted sketches and says only counts and lines.
        """
        view = self._get(principal, file_id)
        report = view.row.scan_summary.get("quality")
        if report is None:
            raise ConflictError(f"file {file_id!r} has no quality report (it is not a JSONL dataset, or it was "
                                "uploaded before quality reports): re-scan it with POST /v1/files/{file_id}/scan",
                                param="file_id")
        if reveal and not role_allows(principal.role, Permission.FILES_CONTENT):
            raise PermissionDeniedError(f"role {principal.role.value!r} may not reveal duplicate records "
                                        f"({Permission.FILES_CONTENT.value!r} needed)", param="reveal")
        leak = None
        if compare:
            try:
                other = self._get(principal, compare) if compare != file_id else view
            except NotFoundError as exc:
                raise NotFoundError(str(exc), param="compare") from None
            if other.row.project_id != view.row.project_id:
                raise NotFoundError(f"file {compare!r} not found in project {view.project!r}", param="compare")
            if quality_sketch_of(other.row) is None:
                raise ConflictError(f"file {compare!r} has no quality report to compare: re-scan it with "
                                    f"POST /v1/files/{compare}/scan", param="compare")
            with self.db.read() as s:
                found = self.leakage_between(s, view.row, other.row)
            leak = {"file_id": file_id, "compare": compare} | (found or {})
        examples = None
        if reveal:
            groups = {"exact_duplicates": report["exact_duplicates"]["examples"],
                      "near_duplicates": report["near_duplicates"]["examples"]}
            wanted = {r for found in groups.values() for g in found for r in g["records"]}
            # Read without the writer's lock (the records may lie at the end of a large file), then audited in a
            # short transaction of its own, before anything is returned.
            with self.db.read() as s:
                texts: dict[int, list[str]] = {}
                for index, raw in _lines_of(self.blobs.read(s, view.row.content_object)):
                    if index in wanted and (parsed := parse_line(raw, index + 1, validate=False)) is not None:
                        texts[index] = [_clip(f"{path}: {text}") for path, text in iter_text_fields(parsed)]
                    if len(texts) == len(wanted):
                        break
            with self.db.transaction() as s:
                record(s, ctx, "file.quality_reveal", resource_type="file", resource_id=file_id,
                       project=view.project, details={"records": len(texts)})
            examples = {kind: [{"lines": g["lines"], "records": [texts.get(r, []) for r in g["records"]]}
                               for g in found] for kind, found in groups.items()}
        return view, report, examples, leak

    def leakage_between(self, s: Session, train: StoredFile, other: StoredFile) -> dict[str, Any] | None:
        """The records of ``other`` (a validation or test file) found exactly or nearly in ``train``, from their
        encrypted sketches read in the caller's transaction (:func:`appliance.files.quality.leakage`); ``None``
        when either file has no quality report. Counts and line numbers only."""
        sketches = [quality_sketch_of(train), quality_sketch_of(other)]
        if None in sketches:
            return None
        openers = [self.blobs.opener(s, object_id) for object_id in sketches]
        train_sketch, other_sketch = (load_sketch(b"".join(opener())) for opener in openers)
        return leakage(train_sketch, other_sketch)

    def review_values(self, principal: Principal, project: Project, file_id: str,
                      groups: list[str]) -> list[tuple[str, str | None]]:
        """The ``(value, entity_type)`` of the named groups of a file's review, to add to ``project``'s glossary.

        The file must be one of ``project``'s that ``principal`` may read (else 404); every group must be in its
        review and none may be a secret (else 400). The policy service calls this
        (:attr:`appliance.policy.service.PolicyService.file_review`).
        """
        view = self._get(principal, file_id)
        if view.row.project_id != project.id:
            raise NotFoundError(f"file {file_id!r} not found in project {project.name!r}", param="file_id")
        pairs: list[tuple[str, str | None]] = []
        if groups:
            _, found = self.scan_groups(principal, None, file_id, reveal=True)
            by_id = {g.id: g for g in found}
            for i, gid in enumerate(groups):
                if gid not in by_id:
                    raise InvalidRequestError(f"groups[{i}]: no group {gid!r} in the review of file {file_id!r}",
                                              param=f"groups[{i}]")
                if by_id[gid].secret:
                    raise InvalidRequestError(f"groups[{i}]: {gid!r} is a secret ({by_id[gid].entity_type}); no "
                                              "review makes a credential safe to train on", param=f"groups[{i}]")
                pairs.append((check_value(by_id[gid].value, f"groups[{i}]"), by_id[gid].entity_type))
        return pairs

    def rescan(self, principal: Principal, ctx: AuditContext, file_id: str) -> FileView:
        """Apply the project's current policy and glossary to the kept original, without a new upload.

        The stored content, its findings and the file's ``policy_hash`` and
        ``content_sha256`` are replaced; the previous content is
        crypto-shredded. Refused while a job that is not finished uses the
        file; if the policy now blocks something, nothing changes (422).
        """
        view = self._get(principal, file_id)
        row = view.row
        if row.purpose not in RESCANNABLE:
            raise InvalidRequestError(f"file {file_id!r} has purpose {row.purpose!r}: only "
                                      f"{' and '.join(f'`{p}`' for p in sorted(RESCANNABLE))} files are re-scanned",
                                      param="file_id")
        if row.original_id is None:
            raise ConflictError(f"file {file_id!r} has no kept original to re-scan: upload it again",
                                param="file_id")
        with self.db.read() as s:
            project = project_by_id(s, row.project_id)
            self._check_unused(s, file_id)
        policy = self.policies.effective(project)
        blob_id = f"{file_id}.r{row.revision + 1}"
        writer = self.blobs.create(blob_id, project.name, "file")
        sketch: BlobWriter | None = None
        state: dict[str, Any] = {"purpose": row.purpose, "project": project, "policy": policy}
        try:
            before = row.scan_summary.get("quality") or {}
            quality = self.quality_pass(before.get("tokenizer"), before.get("max_seq_length"), strict=False)
            intake = JsonlIntake(writer, self.scanner, policy, max_line_bytes=self.settings.max_line_bytes,
                                 max_findings=self.settings.max_findings, quality=quality)
            with self.db.read() as s:
                chunks = self.blobs.read(s, row.original_id)
            for chunk in chunks:
                intake.feed(chunk)
            report = intake.close()
            if report.blocked:
                raise PolicyViolationError(_blocked_message(report).replace("file rejected", "re-scan refused"),
                                           param="file_id",
                                           details=report.summary(policy) | {"blocked_lines": report.blocked_lines})
            _check_quality(report, policy, "re-scan refused", param="file_id")
            key_row = writer.finish()
            sketch = self.blobs.create(quality_id(file_id, row.revision + 1), project.name, "file-quality")
            sketch_row = _write_sketch(sketch, quality, report)
            with self.db.transaction() as s:
                current = s.get(StoredFile, file_id, with_for_update=True)
                if current.deleted_at is not None or current.revision != row.revision:
                    raise ConflictError(f"file {file_id!r} changed during the re-scan: try again", param="file_id")
                self._check_unused(s, file_id)
                previous = {"policy_hash": current.policy_hash, "content_sha256": current.content_sha256,
                            "by_entity_type": current.scan_summary.get("by_entity_type"),
                            "by_action": current.scan_summary.get("by_action")}
                old_blob, old_sketch = current.content_object, quality_sketch_of(current)
                s.add_all([key_row, sketch_row])
                self.blobs.shred(s, old_blob)
                if old_sketch is not None:
                    self.blobs.shred(s, old_sketch)
                s.query(ScanFinding).filter(ScanFinding.file_id == file_id).delete()
                current.blob_id, current.revision = blob_id, current.revision + 1
                current.bytes, current.records = report.stored_bytes, report.records
                current.content_sha256, current.policy_hash = report.content_sha256, policy.content_hash
                current.scan_summary = report.summary(policy)
                s.flush()
                _add_findings(s, file_id, report)
                record(s, ctx, "file.rescan", resource_type="file", resource_id=file_id, project=project.name,
                       details={"revision": current.revision, "previous": previous,
                                "policy_hash": policy.content_hash, "content_sha256": report.content_sha256,
                                "by_entity_type": dict(report.by_type), "by_action": dict(report.by_action),
                                "kek_id": key_row.kek_id})
        except ApplianceError as exc:
            for w in (writer, sketch):
                if w is not None:
                    w.abort()
            self._audit_rejection(ctx, state, exc, action="file.rescan", file_id=file_id)
            raise
        except BaseException:
            for w in (writer, sketch):
                if w is not None:
                    w.abort()
            raise
        self.blobs.remove(old_blob)
        if old_sketch is not None:
            self.blobs.remove(old_sketch)
        return self._get(principal, file_id)

    def _check_unused(self, s: Session, file_id: str) -> None:
        job = next((found for finder in self.users_of if (found := finder(s, file_id)) is not None), None)
        if job is not None:
            raise ConflictError(f"file {file_id!r} is in use by {job!r}, which has not finished: cancel it or "
                                "wait before re-scanning", param="file_id")

    def count(self, principal: Principal) -> int:
        """How many files (not deleted) the caller's project holds; every project's for a global role."""
        with self.db.read() as s:
            stmt = select(func.count()).select_from(StoredFile).where(StoredFile.deleted_at.is_(None))
            if principal.project_id is not None:
                stmt = stmt.where(StoredFile.project_id == principal.project_id)
            return s.scalar(stmt) or 0

    # -- what a job reads and writes (in the caller's transaction) ----------------------------
    @staticmethod
    def trainable_file(s: Session, principal: Principal, project: Project, file_id: Any, param: str,
                       purpose: str | None = "fine-tune") -> StoredFile:
        """The named file if a job of ``project`` may train on it (in the caller's transaction).

        ``purpose`` None (the model is unknown) skips the purpose check.
        """
        if file_id is not None and not isinstance(file_id, str):
            raise InvalidRequestError(f"`{param}` must be a file id such as 'file-abc123'; got "
                                      f"{echo(file_id, MODEL_NAME_LIKE)}", param=param)
        row = s.get(StoredFile, file_id) if file_id else None
        if row is not None and row.deleted_at is None and principal.project_id not in (None, row.project_id):
            raise CrossProjectDenied(f"file {file_id!r} not found in project {project.name!r}", param=param)
        if row is None or row.deleted_at is not None or row.project_id != project.id:
            raise NotFoundError(f"file {file_id!r} not found in project {project.name!r}", param=param)
        if purpose is not None and row.purpose == "evals" and purpose != "evals":
            raise InvalidRequestError(f"file {file_id!r} is a test file (purpose 'evals'): test files are never "
                                      f"used for training; upload training data with purpose {purpose!r}",
                                      param=param)
        if purpose is not None and row.purpose != purpose:
            raise InvalidRequestError(f"file {file_id!r} has purpose {row.purpose!r}; this model trains on "
                                      f"{purpose!r} files", param=param)
        if row.status != "processed" or row.decision != "accepted":
            raise InvalidRequestError(f"file {file_id!r} has not passed scanning (status {row.status!r})",
                                      param=param)
        return row

    def is_live(self, s: Session, file_id: str) -> bool:
        """Whether ``file_id`` exists and has not been deleted (crypto-shredded)."""
        row = s.get(StoredFile, file_id)
        return row is not None and row.deleted_at is None

    @staticmethod
    def created_before(s: Session, until: datetime, project_id: int | None = None) -> list[StoredFile]:
        """Every file created before ``until`` (deleted ones too), of one project or all, oldest first (reports)."""
        return created_before(s, StoredFile, until, project_id)

    @staticmethod
    def datasets_created_before(s: Session, project_id: int, cutoff: datetime) -> list[tuple[str, datetime]]:
        """``(id, created_at)`` of the project's live datasets (fine-tune data, not results) created by ``cutoff``."""
        stmt = select(StoredFile.id, StoredFile.created_at).where(
            StoredFile.project_id == project_id, StoredFile.deleted_at.is_(None), StoredFile.created_at <= cutoff,
            StoredFile.purpose.in_(PURPOSES))
        return [tuple(r) for r in s.execute(stmt.order_by(StoredFile.created_at, StoredFile.id))]

    @staticmethod
    def lock_live(s: Session, file_id: str) -> StoredFile | None:
        """Lock a live file's row for a deletion in ``s``; None when gone or another transaction holds it."""
        return s.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.deleted_at.is_(None))
                        .with_for_update(skip_locked=True))

    def dataset_keys(self, s: Session, datasets: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """What a worker needs to decrypt each ``(role, file_id)`` in memory: object, project, path, data key.

        The stored content is the file's current object (a re-scan writes a new one).
        """
        specs = []
        for role, file_id in datasets:
            object_id = s.get(StoredFile, file_id).content_object
            data_key, project = self.blobs.data_key(s, object_id)
            specs.append({"role": role, "object_id": object_id, "project": project,
                          "path": str(self.blobs.path_of(object_id)), "key": base64.b64encode(data_key).decode()})
        return specs

    def lineage(self, s: Session, file_ids: list[str]) -> list[dict[str, Any]]:
        """The datasets of an adapter's manifest: id, content hash, policy hash, records and revision."""
        rows = [s.get(StoredFile, fid) for fid in file_ids]
        return [{"id": f.id, "sha256": f.content_sha256, "policy_hash": f.policy_hash, "records": f.records,
                 "revision": f.revision} for f in rows]

    @staticmethod
    def allowed_findings(s: Session, file_id: str, limit: int, seed: int) -> list[list[Any]]:
        """Up to ``limit`` allowed findings of a file, as stored (record, field, start, end, type; seeded sample)."""
        rows = s.execute(select(ScanFinding.stored_record, ScanFinding.field, ScanFinding.stored_start,
                                ScanFinding.stored_end, ScanFinding.entity_type)
                         .where(ScanFinding.file_id == file_id, ScanFinding.action == "allow",
                                ScanFinding.stored_record.is_not(None))
                         .order_by(ScanFinding.id)).all()
        picked = [list(r) for r in rows]
        if len(picked) > limit:
            picked = sorted(random.Random(seed).sample(picked, limit))
        return picked

    @staticmethod
    def add_result_file(s: Session, *, file_id: str, project_id: int, filename: str, size: int, sha256: str,
                        created_by: str, generated_by: str) -> None:
        """Register a job's result (an evaluation grid, a validation image) already written encrypted as ``file_id``.

        ``size`` and ``sha256`` describe its plaintext (counted as it streamed in).
        """
        s.add(StoredFile(
            id=file_id, project_id=project_id, filename=filename, purpose="fine-tune-results",
            bytes=size, original_bytes=size, records=0, status="processed",
            created_by=created_by, content_sha256=sha256,
            policy_hash="", decision="accepted", scan_summary={"generated_by": generated_by},
        ))

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
        transaction, then runs :attr:`on_shred` (copies of its content go with
        it). Call :meth:`finish_shred` once it has committed.
        """
        row.deleted_at = utcnow()
        evidence = self.blobs.shred(s, row.content_object)
        if row.original_id is not None:
            self.blobs.shred(s, row.original_id)
        if (sketch := quality_sketch_of(row)) is not None:
            self.blobs.shred(s, sketch)
        s.query(ScanFinding).filter(ScanFinding.file_id == row.id).delete()
        record(s, ctx, "file.delete", resource_type="file", resource_id=row.id, project=project, reason=reason,
               details={**(details or {}), "crypto_shred": {"kek_id": evidence.kek_id,
                                                            "key_destroyed_at": evidence.shredded_at.isoformat()}})
        for hook in self.on_shred:
            hook(s, ctx, row.id)
        return evidence

    def shred_live(self, s: Session, ctx: AuditContext, file_id: str, *, reason: str,
                   details: dict[str, Any] | None = None) -> bool:
        """Crypto-shred ``file_id`` in the caller's transaction if it is still live; False if it was not.

        For a copy erased with what it was made from (:attr:`on_shred`'s hooks): the row is locked (waiting for a
        deletion in progress), shredded and audited as :meth:`shred` does; its ciphertext is removed once the
        caller's transaction commits. :attr:`on_delete` is not run (nothing is trained on such a copy).
        """
        row = s.get(StoredFile, file_id, with_for_update=True)
        if row is None or row.deleted_at is not None:
            return False
        objects = [row.content_object, row.original_id, quality_sketch_of(row)]
        self.shred(s, ctx, row, project_by_id(s, row.project_id).name, reason=reason, details=details)
        for object_id in objects:
            if object_id:
                self.blobs.remove_after_commit(s, object_id)
        return True

    def finish_shred(self, file_id: str, ctx: AuditContext) -> None:
        """After a deletion committed: remove the ciphertext and run :attr:`on_delete` (adapter withdrawal)."""
        with self.db.read() as s:
            row = s.get(StoredFile, file_id)
            objects = [row.content_object, row.original_id, quality_sketch_of(row)] if row is not None else [file_id]
        for object_id in objects:
            if object_id:
                self.blobs.remove(object_id)  # after the commit: the key is gone either way
        for hook in self.on_delete:
            hook(file_id, ctx)


def _blocked_message(report: IntakeReport) -> str:
    parts = []
    for entity, lines in sorted(report.blocked_lines.items()):
        shown = ", ".join(map(str, lines))
        more = " and more" if len(lines) >= 20 else ""
        parts.append(f"{entity} on line{'s' if len(lines) > 1 else ''} {shown}{more}")
    return "file rejected by the project's policy: " + "; ".join(parts)


def _check_quality(report: IntakeReport, policy, refused: str, *, param: str = "file") -> None:
    """Refuse a file whose quality report is over the policy's ``quality.block_over`` limits (none by default).

    Raises:
        PolicyViolationError: Naming each problem, its share of the records and the limit.
    """
    over = policy.quality_violations(report.quality) if report.quality is not None else {}
    if over:
        parts = [f"{code} in {v['count']} of {report.records} records ({v['share']:.1%}, over the limit of "
                 f"{v['limit']:.0%})" for code, v in over.items()]
        raise PolicyViolationError(f"{refused} by the project's policy (quality.block_over): " + "; ".join(parts) +
                                   "; see the quality report's advice, fix the file and upload it again",
                                   param=param, details=report.summary(policy) | {"quality_blocked": over})


@dataclass
class FindingGroup:
    """The findings of one distinct value in a file (see :meth:`FileService.scan_groups`)."""

    id: str
    #: The value: callers show it only to those allowed to reveal it.
    value: str
    #: Whether the project's policy (its allow list or glossary) now allows it.
    allowed: bool = False
    #: Found as a secret (a credential): its value is never shown and no glossary allows it.
    secret: bool = False
    count: int = 0
    records: int = 0
    score: float = 0.0
    entity_types: dict[str, int] = dataclasses.field(default_factory=dict)
    actions: dict[str, int] = dataclasses.field(default_factory=dict)
    first_lines: list[int] = dataclasses.field(default_factory=list)
    contexts: list[str] = dataclasses.field(default_factory=list)
    _last_record: int = -1

    def add(self, f: ScanFinding, record_index: int) -> None:
        self.secret = self.secret or f.entity_type in SECRET_ENTITIES
        self.count += 1
        self.score = max(self.score, f.score)
        self.entity_types[f.entity_type] = self.entity_types.get(f.entity_type, 0) + 1
        self.actions[f.action] = self.actions.get(f.action, 0) + 1
        if record_index != self._last_record:
            self._last_record = record_index
            self.records += 1
            if len(self.first_lines) < 5:
                self.first_lines.append(record_index + 1)

    @property
    def entity_type(self) -> str:
        """The type it was found as most often."""
        return max(self.entity_types.items(), key=lambda kv: (kv[1], kv[0]))[0]


def _texts_of(chunks: Iterator[bytes], records: set[int]) -> Iterator[tuple[tuple[int, str], str]]:
    """``((record index, field path), text)`` of the wanted records of a JSONL stream, in order."""
    for index, raw in _lines_of(chunks):
        if index in records:
            record = parse_line(raw, index + 1)
            if record is not None:
                for path, text in iter_text_fields(record):
                    yield (index, path), text


def _lines_of(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """``(0-based line index, raw line)`` of a JSONL stream."""
    pending = bytearray()
    index = 0
    for chunk in chunks:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield index, bytes(pending[start:end])
            index += 1
            start = end + 1
        del pending[:start]
    if pending:
        yield index, bytes(pending)


def masked_context(text: str, target: ScanFinding, in_field: list[ScanFinding], width: int = 48) -> str:
    """The stored (redacted) text around a finding's stored span, every finding of the field there
    shown as ``<TYPE>`` (the target as ``⟦TYPE⟧``): where it is, never what it was."""
    start, end = target.stored_start, target.stored_end
    left, right = max(0, start - width), min(len(text), end + width)
    marks = sorted((max(f.stored_start, left), min(f.stored_end, right),
                    f"⟦{f.entity_type}⟧" if f is target else f"<{f.entity_type}>") for f in in_field
                   if f.stored_start is not None and f.stored_end > left and f.stored_start < right)
    return _splice(text, left, right, marks)


def _context(text: str, target: ScanFinding, in_field: list[ScanFinding], width: int = 48) -> str:
    """The text around ``target``, the value as ``[[value]]`` and other findings as ``<TYPE>``."""
    left, right = max(0, target.start - width), min(len(text), target.end + width)
    marks = [(max(f.start, left), min(f.end, right), f"<{f.entity_type}>") for f in in_field
             if f is not target and f.end > left and f.start < right
             and not (f.start < target.end and target.start < f.end)]
    marks.append((target.start, target.end, f"[[{text[target.start:target.end]}]]"))
    return _splice(text, left, right, sorted(marks))


def _splice(text: str, left: int, right: int, marks: list[tuple[int, int, str]]) -> str:
    """``text[left:right]`` with each ``(start, end, label)`` of ``marks`` (sorted) replaced by its label,
    ``…`` where the window cuts the text."""
    out, pos = ["…" if left > 0 else ""], left
    for start, end, label in marks:
        if start < pos:
            continue  # overlaps the previous mark, which hides it
        out += [text[pos:start], label]
        pos = end
    out += [text[pos:right], "…" if right < len(text) else ""]
    return "".join(out)


def quality_id(file_id: str, revision: int = 1) -> str:
    """The blob-store object of a file's quality sketch (per-record digests and MinHash signatures)."""
    return f"{file_id}.quality" if revision == 1 else f"{file_id}.quality.r{revision}"


def quality_sketch_of(row: StoredFile) -> str | None:
    """The quality sketch object of a stored file, if it has one."""
    return ((row.scan_summary or {}).get("quality") or {}).get("sketch")


def _write_sketch(writer: BlobWriter, quality: QualityPass, report: IntakeReport) -> Any:
    """Write the sketch encrypted, name it in ``report.quality``; its (unsaved) key row."""
    writer.write(quality.sketch())
    if report.quality is not None:
        report.quality["sketch"] = writer.object_id
    return writer.finish()


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def original_id(file_id: str) -> str:
    """The blob-store object of a file's kept original."""
    return f"{file_id}.original"


def _add_findings(s: Session, file_id: str, report: IntakeReport) -> None:
    s.add_all(
        ScanFinding(file_id=file_id, record=f.record, field=f.field, entity_type=f.entity_type,
                    start=f.start, end=f.end, score=round(float(f.score), 4), action=f.action,
                    **_stored_location(report.stored_spans.get(i)))
        for i, f in enumerate(report.findings)
    )


def _stored_location(span: tuple[int, int, int] | None) -> dict[str, int | None]:
    record, start, end = span if span is not None else (None, None, None)
    return {"stored_record": record, "stored_start": start, "stored_end": end}
