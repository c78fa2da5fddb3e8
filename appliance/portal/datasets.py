"""Datasets: upload with progress, scan reports with redacted previews, crypto-shred."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from datetime import UTC, datetime
from typing import Annotated, Any

from anyio import to_thread
from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, FromQuery
from litestar.response import Redirect, Response, Template

from appliance.errors import ApplianceError
from appliance.files.service import RESCANNABLE, FileService, FileView, masked_context
from appliance.identity.roles import Permission, role_allows
from appliance.portal.render import bar_chart, page, portal, session_of
from appliance.web.context import audit_context
from appliance.web.errors import body_of
from appliance.services import AppState

Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
PREVIEW_RECORDS = 5
#: Findings per page of the scan report (every page is reachable; so is every record with findings).
FINDINGS_PAGE = 100
PREVIEW_IMAGES = 8
#: Image archives are read whole for their captions: only up to this size.
PREVIEW_ARCHIVE_BYTES = 32 * 1024 * 1024
#: Value groups shown in the review step (the API has them all).
REVIEW_GROUPS = 200


@get("/datasets", opt=portal(Permission.FILES_READ), include_in_schema=False, sync_to_thread=True)
def dataset_list(request: Request, files: NamedDependency[FileService], appliance: NamedDependency[AppState]) -> Template:
    principal = session_of(request).principal
    views, _ = files.list(principal, project=None, purpose=None, after=None, limit=500, order="desc")
    projects = [p.name for p in appliance.identity.list_projects(principal)] if principal.project is None else []
    writes = role_allows(principal.role, Permission.FILES_WRITE)
    rejected = [r | {"when": datetime.fromtimestamp(r["rejected_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")}
                for r in files.rejections(principal, limit=20)] if writes else []
    # The quality report counts tokens with a text base model's tokenizer (the API's `model` field): the names
    # of the imported base models only, the first being the default.
    tokenizers = [r.name for r in files.base_models() if r.kind == "llm"] if writes else []
    return page(request, "datasets.html", section="datasets", title="Datasets", files=views, projects=projects,
                rejected=rejected, tokenizers=tokenizers)


@post("/datasets/upload", opt=portal(Permission.FILES_WRITE), include_in_schema=False, request_max_body_size=None)
async def upload(request: Request, files: NamedDependency[FileService]) -> Response | Redirect:
    """The drag-and-drop upload (XHR with progress) and the plain form, one endpoint.

    Scripts get JSON (the new file's page, or the error with its scan report);
    the plain form gets a redirect or an error page.
    """
    wants_json = "application/json" in request.headers.get("accept", "")
    headers = dict(request.headers)
    if request.query_params.get("project"):
        headers["openai-project"] = request.query_params["project"]
    try:
        view = await files.upload(session_of(request).principal, audit_context(request), headers, request.stream())
    except ApplianceError as exc:
        if not wants_json:
            raise
        status, body = body_of(exc)  # the API's error body, with the scan report of a policy violation
        return Response(body, status_code=status)
    target = f"/datasets/{view.row.id}"
    if wants_json:
        return Response({"id": view.row.id, "redirect": target}, status_code=201)
    return Redirect(target, status_code=303)


@get("/datasets/{file_id:str}", opt=portal(Permission.FILES_READ), include_in_schema=False, sync_to_thread=True)
def dataset(request: Request, files: NamedDependency[FileService], file_id: FromPath[str],
            findings_page: FromQuery[int] = 1, records: FromQuery[str] = "first") -> Template:
    """The scan report: findings page by page with their masked context, and a preview of the stored records:
    the first ones, or (``records=findings``) those with this page's findings."""
    principal = session_of(request).principal
    view, findings = files.scan_report(principal, file_id)
    pages = max(1, -(-len(findings) // FINDINGS_PAGE))
    current = min(max(1, findings_page), pages)
    shown = findings[(current - 1) * FINDINGS_PAGE: current * FINDINGS_PAGE]
    with_findings = records == "findings"
    preview: list[tuple[int, str]] = []
    contexts: dict[int, str] = {}
    archive: dict[str, Any] = {}
    if role_allows(principal.role, Permission.FILES_CONTENT):
        # The stored content is already redacted by the policy: show its records and the text around findings.
        if view.row.purpose == "fine-tune-images":
            _, chunks = files.content(principal, audit_context(request), file_id)
            archive = _archive_preview(chunks, view.row.bytes)
        else:
            located = {f.stored_record for f in shown if f.stored_record is not None}
            wanted = located | (set() if with_findings else set(range(PREVIEW_RECORDS)))
            stored = files.stored_records(principal, audit_context(request), file_id, wanted)
            contexts = _contexts(stored, shown, findings)
            lines = sorted(located) if with_findings else sorted(set(range(PREVIEW_RECORDS)) & set(stored))
            preview = [(i + 1, json.dumps(stored[i], ensure_ascii=False, indent=1)) for i in lines if i in stored]
    summary = view.row.scan_summary
    review = _review(request, files, view, bool(findings))
    quality = _quality(request, files, view)
    return page(request, "dataset.html", section="datasets", title=view.row.filename, view=view, quality=quality,
                findings=shown, findings_total=len(findings), findings_page=current, findings_pages=pages,
                records_with_findings=len({f.record for f in findings}), with_findings=with_findings,
                contexts=contexts, preview=preview, archive=archive,
                chart=bar_chart(summary.get("by_entity_type") or {}), summary=summary, review=review,
                flashes=_review_flashes(request))


def _contexts(stored: dict[int, dict[str, Any]], shown: list, findings: list) -> dict[int, str]:
    """Finding id -> the stored text around it, every finding there masked as its type."""
    from appliance.scanning import iter_text_fields

    by_field: dict[tuple[int, str], list] = {}
    for f in findings:
        if f.stored_record in stored:
            by_field.setdefault((f.stored_record, f.field), []).append(f)
    texts: dict[tuple[int, str], str] = {}
    for index, record in stored.items():
        try:
            texts.update({(index, path): text for path, text in iter_text_fields(record)})
        except ApplianceError:  # a stored record of another shape: no context, the finding still shows
            continue
    out = {}
    for f in shown:
        text = texts.get((f.stored_record, f.field))
        if text is not None and f.stored_start is not None and f.stored_end <= len(text):
            out[f.id] = masked_context(text, f, by_field[(f.stored_record, f.field)])
    return out


def _review(request: Request, files: FileService, view: FileView, any_findings: bool) -> dict[str, Any] | None:
    """The review step between upload and training: findings by value, values for data owners on request."""
    if not any_findings or view.row.original_id is None or view.row.purpose not in RESCANNABLE:
        return None
    principal = session_of(request).principal
    may_reveal = role_allows(principal.role, Permission.FILES_CONTENT)
    reveal = may_reveal and request.query_params.get("reveal") == "1"
    _, groups = files.scan_groups(principal, audit_context(request), view.row.id, reveal=reveal)
    return {"groups": groups[:REVIEW_GROUPS], "more": max(0, len(groups) - REVIEW_GROUPS), "reveal": reveal,
            "may_reveal": may_reveal}


def _quality(request: Request, files: FileService, view: FileView) -> dict[str, Any] | None:
    """The quality report beside the scan; duplicate examples for data owners on request (audited), and the
    leakage against another file of the project (``compare``)."""
    report = view.row.scan_summary.get("quality")
    if report is None:
        return None
    principal = session_of(request).principal
    may_reveal = role_allows(principal.role, Permission.FILES_CONTENT)
    reveal = may_reveal and request.query_params.get("quality_reveal") == "1"
    compare = request.query_params.get("compare") or None
    examples = leak = error = None
    if reveal or compare:
        try:
            _, report, examples, leak = files.quality(principal, audit_context(request), view.row.id, reveal=reveal,
                                                      compare=compare)
        except ApplianceError as exc:  # e.g. a file to compare without a report: said on the page
            error = exc.message
    others, _ = files.list(principal, project=view.project if principal.project is None else None, purpose=None,
                           after=None, limit=500, order="desc")
    candidates = [(v.row.id, v.row.filename) for v in others
                  if v.row.id != view.row.id and v.row.scan_summary.get("quality") is not None]
    return {"report": report, "may_reveal": may_reveal, "reveal": reveal, "examples": examples, "leakage": leak,
            "compare": compare, "error": error, "candidates": candidates,
            "languages": bar_chart(report.get("languages") or {})}


def _review_flashes(request: Request) -> list[tuple[str, str]]:
    added, revision = request.query_params.get("added"), request.query_params.get("revision")
    if not (added and added.isdigit() and revision and revision.isdigit()):
        return []
    return [("ok", f"{added} value{'s' if added != '1' else ''} added to the project's glossary; "
                   f"the file was re-scanned (revision {revision}).")]


@post("/datasets/{file_id:str}/review", opt=portal(Permission.FILES_WRITE), include_in_schema=False)
async def review(request: Request, files: NamedDependency[FileService], file_id: FromPath[str]) -> Redirect:
    """Mark the checked groups as not personal data for the project, then re-scan the file."""
    form = await request.form()
    groups = [g for g in form.getall("group", []) if g]
    principal, ctx = session_of(request).principal, audit_context(request)

    def apply() -> tuple[int, int]:
        view = files.get(principal, file_id)
        added = 0
        if groups:
            project = files.project_of(view)
            _, added = files.policies.add_to_glossary(principal, ctx, project, values=[], file_id=file_id,
                                                         groups=groups)
        return added, files.rescan(principal, ctx, file_id).row.revision

    added, revision = await to_thread.run_sync(apply)
    return Redirect(f"/datasets/{file_id}?added={added}&revision={revision}", status_code=303)


def _archive_preview(chunks, size: int) -> dict[str, Any]:
    """What a stored image archive holds (small archives only): its instance prompt, image sizes, the first
    captions and images (as ``data:`` URLs; the stored images are already re-encoded without metadata).

    The JSONL preview read an archive as text and failed with a 500.
    """
    if size > PREVIEW_ARCHIVE_BYTES:
        return {}
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as archive:
        names = archive.namelist()
        info = json.loads(archive.read("dataset.json")) if "dataset.json" in names else {}
        captions = []
        if "images/metadata.jsonl" in names:
            for line in archive.read("images/metadata.jsonl").splitlines():
                item = json.loads(line)
                captions.append((item.get("file_name"), item.get("text") or ""))
        images = [(name, "data:image/png;base64," + base64.b64encode(archive.read(f"images/{name}")).decode())
                  for name, _ in captions[:PREVIEW_IMAGES] if f"images/{name}" in names]
    return {"instance_prompt": info.get("instance_prompt"), "sizes": info.get("sizes") or {},
            "captions": dict(captions), "images": images}


@post("/datasets/{file_id:str}/delete", opt=portal(Permission.FILES_WRITE), include_in_schema=False,
      sync_to_thread=True)
def delete_dataset(request: Request, files: NamedDependency[FileService], file_id: FromPath[str],
                   data: Form) -> Template | Redirect:
    principal = session_of(request).principal
    if data.get("confirm") != file_id:
        view, findings = files.scan_report(principal, file_id)
        return page(request, "dataset.html", section="datasets", title=view.row.filename, view=view,
                    findings=findings[:FINDINGS_PAGE], findings_total=len(findings), findings_page=1,
                    findings_pages=max(1, -(-len(findings) // FINDINGS_PAGE)), contexts={},
                    records_with_findings=len({f.record for f in findings}), with_findings=False,
                    preview=[], summary=view.row.scan_summary,
                    chart=bar_chart(view.row.scan_summary.get("by_entity_type") or {}), status_code=400,
                    flashes=[("error", "Type the file id to confirm the deletion.")])
    files.delete(principal, audit_context(request), file_id)
    return Redirect("/datasets", status_code=303)


ROUTES = [dataset_list, upload, dataset, review, delete_dataset]
