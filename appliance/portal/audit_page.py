"""Audit: a filterable event table, chain verification status and exports."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

from litestar import Request, get
from litestar.di import NamedDependency
from typing import Annotated

from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Response, Template

from appliance.audit.service import EventFilter, read_events, verify_chain
from appliance.errors import InvalidRequestError
from appliance.identity.roles import Permission
from appliance.portal.render import page, portal, session_of
from appliance.web.context import audit_context
from appliance.services import AppState

COLUMNS = ("seq", "ts", "actor", "auth_method", "action", "resource_type", "resource_id", "project", "outcome",
           "reason", "origin_ip", "request_id")


def _time(value: str | None, param: str) -> datetime | None:
    if not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(f"`{param}` must be a date or time such as 2026-11-26T10:00; got {value!r}",
                                  param=param) from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _filter(request: Request, actor, action, outcome, since, until, limit: int) -> EventFilter:
    principal = session_of(request).principal
    applied = {k: v for k, v in dict(actor=actor, action=action, outcome=outcome, since=since, until=until).items()
               if v}
    return EventFilter(actor=actor or None, action=action or None, outcome=outcome or None,
                       since=_time(since, "since"), until=_time(until, "until"), limit=limit,
                       projects=None if principal.is_global else (principal.project,), applied=applied)


@get("/audit", opt=portal(Permission.AUDIT_READ), include_in_schema=False, sync_to_thread=True)
def audit(request: Request, appliance: NamedDependency[AppState], actor: FromQuery[str | None] = None,
          action: FromQuery[str | None] = None, outcome: FromQuery[str | None] = None,
          since: FromQuery[str | None] = None, until: FromQuery[str | None] = None) -> Template:
    f = _filter(request, actor, action, outcome, since, until, 500)
    chain = verify_chain(appliance.db)
    rows, has_more = read_events(appliance.db, audit_context(request), f)
    return page(request, "audit.html", section="audit", title="Audit", events=list(reversed(rows)),
                has_more=has_more, chain=chain, q=f.applied, query=str(request.url.query or ""))


@get("/audit/export/{fmt:str}", opt=portal(Permission.AUDIT_READ), include_in_schema=False, sync_to_thread=True)
def export(request: Request, appliance: NamedDependency[AppState], fmt: FromPath[str], actor: FromQuery[str | None] = None,
           action: FromQuery[str | None] = None, outcome: FromQuery[str | None] = None,
           since: FromQuery[str | None] = None, until: FromQuery[str | None] = None) -> Response:
    """The filtered events as CSV or JSON (reading is audited)."""
    if fmt not in ("csv", "json"):
        raise InvalidRequestError(f"export format must be csv or json; got {fmt!r}", param="fmt")
    rows, _ = read_events(appliance.db, audit_context(request),
                          _filter(request, actor, action, outcome, since, until, 100_000))
    records = [{c: (getattr(r, c).isoformat() if c == "ts" else getattr(r, c)) for c in COLUMNS}
               | {"details": r.details, "hash": r.hash} for r in rows]
    if fmt == "json":
        body, media = json.dumps(records, indent=1), "application/json"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "details", "hash"])
        writer.writeheader()
        for rec in records:
            writer.writerow(rec | {"details": json.dumps(rec["details"], sort_keys=True)})
        body, media = buf.getvalue(), "text/csv"
    return Response(body, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="audit-events.{fmt}"'})


@get("/audit/report", opt=portal(Permission.AUDIT_READ), include_in_schema=False, sync_to_thread=True)
def report(request: Request, appliance: NamedDependency[AppState],
           since: Annotated[str | None, QueryParameter(name="from")] = None,
           until: Annotated[str | None, QueryParameter(name="to")] = None,
           format: FromQuery[str] = "html", project: FromQuery[str | None] = None) -> Template | Response:
    """The compliance report for the session (no API token): a form, then the report as a page (HTML) or a
    download (PDF, CSV, JSON). The same report, parameters (``from``, ``to``) and audit event as
    ``GET /api/v1/audit/report`` and ``appliance audit report --from --to``."""
    from appliance.auditor.reports import FORMATS, MEDIA_TYPES, ReportScope, parse_when, produce, produce_page
    from appliance.identity.service import all_projects

    principal = session_of(request).principal
    today = datetime.now(UTC).date()  # by default this month up to now: "to" is exclusive, so tomorrow
    values = {"from": since or today.replace(day=1).isoformat(), "to": until or (today + timedelta(days=1)).isoformat(),
              "format": format, "project": project or ""}
    if principal.is_global:
        with appliance.db.read() as s:
            projects = [p.name for p in all_projects(s)]
    else:
        projects, project = [], principal.project
    context = {"values": values, "projects": projects, "formats": FORMATS, "body": None}
    if since is None and until is None:
        return page(request, "audit_report.html", section="audit", title="Audit report", **context)
    try:
        start, end = parse_when(values["from"], "from"), parse_when(values["to"], "to")
        if format not in FORMATS:
            raise InvalidRequestError(f"`format` must be one of {', '.join(FORMATS)}; got {format!r}",
                                      param="format")
        scope = ReportScope(start, end, project or None)
        if format == "html":
            body = produce_page(appliance.db, audit_context(request), scope)
            return page(request, "audit_report.html", section="audit", title="Audit report",
                        **{**context, "body": body})
        body = produce(appliance.db, audit_context(request), scope, format)
    except InvalidRequestError as exc:
        return page(request, "audit_report.html", section="audit", title="Audit report", status_code=400,
                    flashes=[("error", exc.message)], **context)
    return Response(body, media_type=MEDIA_TYPES[format],
                    headers={"Content-Disposition": f'attachment; filename="audit-report.{format}"'})


ROUTES = [audit, export, report]
