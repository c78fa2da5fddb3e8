"""HTTP routes of the audit log (auditor and admin only; reads are audited)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, QueryParameter

from appliance.auditor.schemas import AuditEventList, AuditEventOut, ChainStatus
from appliance.audit.service import EventFilter, read_events, record_verification, verify_chain
from appliance.errors import InvalidRequestError
from appliance.identity.roles import Permission
from appliance.identity.service import Principal
from appliance.web.context import audit_context
from appliance.web.openapi import operation
from appliance.services import AppState


#: Sequence numbers are SQL BIGINTs: a larger cursor is a 400, not an overflow in the driver.
MAX_SEQ = 2**63 - 1


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def _require_rfc3339(request: Request, *names: str) -> None:
    """Refuse time parameters that are not RFC 3339 strings.

    Litestar parses query values leniently, so ``until=0.5`` became a Unix time
    instead of the 400 that the documented ``date-time`` format promises.
    """
    for name in names:
        raw = request.query_params.get(name)
        if raw is None:
            continue
        try:
            msgspec.convert(raw, datetime)  # strict: only RFC 3339 text
        except msgspec.ValidationError:
            raise InvalidRequestError(
                f"`{name}` must be an RFC 3339 date-time such as 2026-11-26T10:00:00Z; got {raw[:64]!r}", param=name,
            ) from None


class AuditController(Controller):
    path = "/api/v1/audit"
    tags = ["audit"]

    @get("/events", opt={"permission": Permission.AUDIT_READ}, sync_to_thread=True)
    def list_events(
        self,
        request: Request,
        appliance: NamedDependency[AppState],
        since: Annotated[datetime | None, QueryParameter(description="Events at or after this time (UTC if no offset).")] = None,
        until: Annotated[datetime | None, QueryParameter(description="Events before this time.")] = None,
        actor: FromQuery[str | None] = None,
        action: FromQuery[str | None] = None,
        resource_type: FromQuery[str | None] = None,
        resource_id: FromQuery[str | None] = None,
        outcome: FromQuery[Literal["success", "denied", "failure"] | None] = None,
        after: Annotated[int | None, QueryParameter(ge=0, le=MAX_SEQ,
                                                    description="Cursor: the last seq already seen.")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> AuditEventList:
        """Audit events in seq order, filtered, with cursor pagination.

        A project-scoped auditor sees its project's events only.
        """
        _require_rfc3339(request, "since", "until")
        principal: Principal = request.user
        applied = {
            k: (v.isoformat() if isinstance(v, datetime) else v)
            for k, v in dict(since=since, until=until, actor=actor, action=action, resource_type=resource_type,
                             resource_id=resource_id, outcome=outcome, after=after, limit=limit).items()
            if v is not None
        }
        f = EventFilter(
            since=_aware(since), until=_aware(until), actor=actor, action=action, resource_type=resource_type,
            resource_id=resource_id, outcome=outcome, after=after, limit=limit,
            projects=None if principal.is_global else (principal.project,), applied=applied,
        )
        rows, has_more = read_events(appliance.db, audit_context(request), f)
        data = [
            AuditEventOut(**{c: getattr(r, c) for c in AuditEventOut.__struct_fields__ if c != "object"})
            for r in rows
        ]
        return AuditEventList(
            data=data, has_more=has_more,
            first_id=data[0].seq if data else None, last_id=data[-1].seq if data else None,
        )

    @get("/verify", opt={"permission": Permission.AUDIT_READ}, sync_to_thread=True)
    def verify(self, request: Request, appliance: NamedDependency[AppState]) -> ChainStatus:
        """Walk the hash chain now and report the first broken seq, if any."""
        result = verify_chain(appliance.db)
        record_verification(appliance.db, audit_context(request), result)
        return ChainStatus(result.ok, result.events, result.head_seq, result.bad_seq, result.problem)


class AuditReportController(Controller):
    path = "/api/v1/audit/report"
    tags = ["audit"]

    @get(opt={"permission": Permission.AUDIT_READ}, sync_to_thread=True,
         operation_class=operation(also_answers=("text/csv", "text/html", "application/pdf")))
    def report(
        self,
        request: Request,
        appliance: NamedDependency[AppState],
        since: Annotated[str, QueryParameter(name="from", description="Start of the period (inclusive): a date "
                                              "(2026-11-01, midnight UTC) or a date-time (2026-11-01T12:00:00Z).")],
        until: Annotated[str, QueryParameter(name="to", description="End of the period (exclusive), as `from`.")],
        format: FromQuery[Literal["json", "csv", "html", "pdf"]] = "json",
        project: FromQuery[str | None] = None,
    ) -> Response:
        """The compliance report for a period (a project auditor gets their project's)."""
        from appliance.auditor.reports import MEDIA_TYPES, ReportScope, parse_when, produce

        # The same forms as the CLI's --from/--to: a date or a date-time; errors name `from`/`to`.
        start, end = parse_when(since, "from"), parse_when(until, "to")
        principal: Principal = request.user
        if not principal.is_global:
            project = principal.project
        body = produce(appliance.db, audit_context(request), ReportScope(start, end, project), format)
        return Response(body, media_type=MEDIA_TYPES[format],
                        headers={"Content-Disposition": f'attachment; filename="audit-report.{format}"'})


def _tree_size(appliance: AppState, requested: int | None, param: str) -> int:
    """The tree a proof is for: the whole log, or a prefix of it, never more than it holds."""
    head = verify_chain(appliance.db).head_seq
    if requested is not None and requested > head:
        raise InvalidRequestError(f"`{param}` {requested} is beyond the log's {head} events", param=param)
    return requested or head


class AuditProofController(Controller):
    """Signed checkpoints and Merkle proofs (RFC 9162) for auditors."""

    path = "/api/v1/audit"
    tags = ["audit"]

    @post("/checkpoints", opt={"permission": Permission.AUDIT_READ}, status_code=201, sync_to_thread=True)
    def checkpoint(self, request: Request, appliance: NamedDependency[AppState]) -> dict[str, Any]:
        """Sign the current tree head; store the returned document off this machine."""
        from appliance.audit.checkpoints import create_checkpoint

        cp = create_checkpoint(appliance.db, appliance.catalog.signing_key(), audit_context(request))
        return json.loads(cp.to_json())

    @get("/proofs/inclusion", opt={"permission": Permission.AUDIT_READ}, sync_to_thread=True)
    def inclusion_proof(self, appliance: NamedDependency[AppState],
                        seq: Annotated[int, QueryParameter(ge=1, le=MAX_SEQ)],
                        tree_size: Annotated[int | None, QueryParameter(ge=1, le=MAX_SEQ)] = None) -> dict[str, Any]:
        from appliance.audit.checkpoints import inclusion

        size = _tree_size(appliance, tree_size, "tree_size")
        if seq > size:
            raise InvalidRequestError(f"`seq` {seq} is beyond tree size {size}", param="seq")
        return inclusion(appliance.db, seq, size)

    @get("/proofs/consistency", opt={"permission": Permission.AUDIT_READ}, sync_to_thread=True)
    def consistency_proof(self, appliance: NamedDependency[AppState],
                          first: Annotated[int, QueryParameter(ge=1, le=MAX_SEQ)],
                          second: Annotated[int | None, QueryParameter(ge=1, le=MAX_SEQ)] = None) -> dict[str, Any]:
        from appliance.audit.checkpoints import consistency

        size = _tree_size(appliance, second, "second")
        if first > size:
            raise InvalidRequestError(f"`first` {first} is beyond tree size {size}", param="first")
        return consistency(appliance.db, first, size)
