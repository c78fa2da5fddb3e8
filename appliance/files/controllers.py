"""HTTP routes of the Files API (``/v1/files``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.openapi.spec import OpenAPIFormat, OpenAPIType, Schema
from litestar.response import Stream

from appliance.files.schemas import (
    FileDeleted,
    FileList,
    FileObject,
    FindingGroupOut,
    FindingOut,
    QualityReport,
    ScanGroups,
    ScanReport,
)
from appliance.files.service import PURPOSES, FileService, FileView, FindingGroup
from appliance.identity.roles import Permission
from appliance.web.context import audit_context
from appliance.web.openapi import error_responses, operation

#: The upload form as the OpenAPI description shows it (the handler streams it, see ``FileService.upload``).
UPLOAD_FORM = Schema(type=OpenAPIType.OBJECT, required=["purpose", "file"], properties={
    "purpose": Schema(type=OpenAPIType.STRING, enum=sorted(PURPOSES), description="Must come before `file`."),
    "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                   description="JSONL records, or a zip of images and captions for `fine-tune-images`."),
    "instance_prompt": Schema(type=OpenAPIType.STRING, description="Image datasets: the prompt of every image."),
    "model": Schema(type=OpenAPIType.STRING, description="JSONL: the base model whose tokenizer the quality "
                    "report counts tokens with (default: the first imported text model). Before `file`."),
    "max_seq_length": Schema(type=OpenAPIType.INTEGER, description="JSONL: the length the quality report checks "
                             "records against (default: 2048 or the model's context). Before `file`."),
})


def file_object(view: FileView) -> FileObject:
    r = view.row
    return FileObject(
        id=r.id, bytes=r.bytes, created_at=int(r.created_at.timestamp()), filename=r.filename, purpose=r.purpose,
        status=r.status, project=view.project, scan=_without_sketch(r.scan_summary),
    )


def _without_sketch(summary: dict[str, Any]) -> dict[str, Any]:
    """The scan summary as shown: the quality report without the name of its (internal) sketch object."""
    if "sketch" not in (summary.get("quality") or {}):
        return summary
    return summary | {"quality": {k: v for k, v in summary["quality"].items() if k != "sketch"}}


class FileController(Controller):
    path = "/v1/files"
    tags = ["files"]

    @post(opt={"permission": Permission.FILES_WRITE}, request_max_body_size=None, responses=error_responses(413, 422, 507),
          operation_class=operation(body={"multipart/form-data": UPLOAD_FORM}))
    async def upload(self, request: Request, files: NamedDependency[FileService]) -> FileObject:
        """Upload a JSONL training file (multipart: `purpose`, then `file`).

        The file is streamed through validation, the PII and secret scanner and
        the project's policy, redacted where the policy says so, and stored
        encrypted. A file with blocked content is rejected with 422 and a
        report of which entity types were found on which lines.
        """
        view = await files.upload(request.user, audit_context(request), request.headers, request.stream())
        return file_object(view)

    @get(opt={"permission": Permission.FILES_READ}, sync_to_thread=True)
    def list_files(
        self,
        request: Request,
        files: NamedDependency[FileService],
        purpose: FromQuery[str | None] = None,
        after: FromQuery[str | None] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 10_000,
        order: FromQuery[Literal["asc", "desc"]] = "desc",
        project: FromQuery[str | None] = None,
    ) -> FileList:
        views, has_more = files.list(request.user, project=project, purpose=purpose, after=after, limit=limit,
                                     order=order)
        data = [file_object(v) for v in views]
        return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    @get("/{file_id:str}", opt={"permission": Permission.FILES_READ}, sync_to_thread=True)
    def retrieve(self, request: Request, files: NamedDependency[FileService], file_id: FromPath[str]) -> FileObject:
        return file_object(files.get(request.user, file_id))

    @delete("/{file_id:str}", opt={"permission": Permission.FILES_WRITE}, status_code=200, sync_to_thread=True)
    def delete_file(self, request: Request, files: NamedDependency[FileService], file_id: FromPath[str]) -> FileDeleted:
        """Crypto-shred the file: its data key is destroyed and its ciphertext removed."""
        view = files.delete(request.user, audit_context(request), file_id)
        return FileDeleted(id=view.row.id)

    @get("/{file_id:str}/content", opt={"permission": Permission.FILES_CONTENT}, media_type="application/octet-stream",
         sync_to_thread=True)
    def content(self, request: Request, files: NamedDependency[FileService], file_id: FromPath[str]) -> Stream:
        """The stored (possibly redacted) content, decrypted. Audited."""
        view, chunks = files.content(request.user, audit_context(request), file_id)
        return Stream(chunks, media_type="application/octet-stream",
                      headers={"Content-Disposition": f'attachment; filename="{view.row.id}.jsonl"'})

    @get("/{file_id:str}/scan", opt={"permission": Permission.FILES_READ}, sync_to_thread=True,
         responses=error_responses(409))
    def scan(self, request: Request, files: NamedDependency[FileService], file_id: FromPath[str],
             group_by: Annotated[Literal["finding", "value"], QueryParameter()] = "finding",
             reveal: FromQuery[bool] = False) -> ScanReport | ScanGroups:
        """What the scanner found and what the policy did.

        `group_by=finding` (default): per record and field, never the values.
        `group_by=value`: one group per distinct value, for reviewing a file
        before training; `reveal=true` adds each value and its contexts (data
        owners only; audited). Mark groups as not personal data with
        `POST /api/v1/projects/{name}/glossary`, then re-scan with
        `POST /v1/files/{file_id}/scan`.
        """
        if group_by == "value":
            view, groups = files.scan_groups(request.user, audit_context(request), file_id, reveal=reveal)
            return ScanGroups(
                file_id=view.row.id, decision=view.row.decision, policy_hash=view.row.policy_hash,
                revision=view.row.revision, records=view.row.records, counts=_counts(view),
                groups=[_group_out(g, reveal) for g in groups],
            )
        view, findings = files.scan_report(request.user, file_id)
        return ScanReport(
            file_id=view.row.id, decision=view.row.decision, policy_hash=view.row.policy_hash,
            records=view.row.records, counts=_counts(view),
            findings=[FindingOut(f.record, f.field, f.entity_type, f.start, f.end, f.score, f.action)
                      for f in findings],
        )


    @get("/{file_id:str}/quality", opt={"permission": Permission.FILES_READ}, sync_to_thread=True,
         responses=error_responses(409))
    def quality(self, request: Request, files: NamedDependency[FileService], file_id: FromPath[str],
                reveal: FromQuery[bool] = False, compare: FromQuery[str | None] = None) -> QualityReport:
        """The dataset quality report computed at upload: record and token counts, lengths (and how many
        records `max_seq_length` would cut), exact and near duplicates, empty or one-sided conversations,
        role order, languages, each problem with what to do. Nothing blocks unless the policy says so.

        `reveal=true` adds the stored (redacted) text of the duplicate examples (data owners only;
        audited). `compare=<file id>` reports the records of that file (a validation or test file) that
        are also, exactly or nearly, in this one.
        """
        view, report, examples, leak = files.quality(request.user, audit_context(request), file_id, reveal=reveal,
                                                     compare=compare)
        return QualityReport(file_id=view.row.id, revision=view.row.revision,
                             quality=_without_sketch({"quality": report})["quality"], examples=examples,
                             leakage=leak)

    @post("/{file_id:str}/scan", opt={"permission": Permission.FILES_WRITE}, status_code=200, sync_to_thread=True,
          responses=error_responses(409, 422))
    def rescan(self, request: Request, files: NamedDependency[FileService], file_id: FromPath[str]) -> FileObject:
        """Re-scan the file's kept original under the project's current policy and glossary.

        No new upload: the stored content and findings are replaced (the
        previous content is crypto-shredded) and the file keeps its id. 409
        while an unfinished job uses the file; 422 (nothing changed) if the
        policy now blocks something.
        """
        return file_object(files.rescan(request.user, audit_context(request), file_id))


def _counts(view: FileView) -> dict[str, Any]:
    summary = view.row.scan_summary
    return {k: summary.get(k) for k in ("findings", "by_entity_type", "by_action", "redacted_records",
                                        "findings_truncated")}


def _group_out(g: FindingGroup, reveal: bool) -> FindingGroupOut:
    return FindingGroupOut(
        id=g.id, entity_type=g.entity_type, entity_types=g.entity_types, count=g.count, records=g.records,
        score=round(g.score, 4), actions=g.actions, first_lines=g.first_lines,
        value=g.value if reveal and not g.secret else None, contexts=g.contexts if reveal else None,
        secret=g.secret,
        allowed=g.allowed,
    )


class RejectedUploadController(Controller):
    """The caller's own refused uploads (an appliance extension beside OpenAI's files API)."""

    path = "/api/v1/files/rejected"
    tags = ["files"]

    @get(opt={"permission": Permission.FILES_WRITE}, sync_to_thread=True,
         summary="Your refused uploads, newest first, with the reason")
    def list_rejected(
        self, request: Request, files: NamedDependency[FileService],
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """Nothing of a refused upload's content is kept; its owner still sees when, which file and why."""
        return {"object": "list", "data": files.rejections(request.user, limit=limit)}
