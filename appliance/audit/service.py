"""Appending to, querying and verifying the audit log.

:func:`record` appends inside the caller's session, so an action and the event
recording it commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.audit.chain import event_hash
from appliance.audit.models import GENESIS_HASH, AuditEvent, AuditHead
from appliance.db.base import Database, utcnow
from appliance.logs import scrub

Outcome = Literal["success", "denied", "failure"]


@dataclass(frozen=True)
class AuditContext:
    """Who is acting, how and from where; carried from the request to services."""

    actor: str
    auth_method: str
    origin_ip: str | None = None
    request_id: str | None = None

    @classmethod
    def cli(cls, os_user: str) -> AuditContext:
        return cls(actor=f"cli:{os_user}", auth_method="cli", origin_ip="local")


def _clean(value: Any) -> Any:
    """Scrub token-shaped strings out of event details (defence in depth)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def ensure_head(session: Session) -> None:
    """Create the chain head row if the log is brand new."""
    if session.get(AuditHead, 1) is None:
        session.add(AuditHead(id=1, seq=0, hash=GENESIS_HASH))
        session.flush()


def record(
    session: Session,
    ctx: AuditContext,
    action: str,
    *,
    outcome: Outcome = "success",
    resource_type: str | None = None,
    resource_id: str | None = None,
    project: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event in ``session``'s transaction and return it.

    Args:
        session: The transaction of the action being recorded.
        ctx: Actor, auth method, origin and request id.
        action: Dotted verb such as ``token.create`` or ``auth.denied``.
        outcome: ``success``, ``denied`` or ``failure``.
        resource_type: Kind of object acted on (``token``, ``project``...).
        resource_id: Its public id; never a secret.
        project: Project name the object belongs to, if any.
        reason: Why it was denied or failed; no secrets or raw personal data.
        details: Extra JSON-safe metadata, equally free of secrets and PII.
    """
    head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one_or_none()
    if head is None:
        ensure_head(session)
        head = session.get(AuditHead, 1)
    fields: dict[str, Any] = {
        "seq": head.seq + 1,
        "ts": utcnow(),
        "actor": ctx.actor,
        "auth_method": ctx.auth_method,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "project": project,
        "outcome": outcome,
        "reason": scrub(reason) if reason else reason,
        "origin_ip": ctx.origin_ip,
        "request_id": ctx.request_id,
        "details": _clean(details or {}),
        "prev_hash": head.hash,
    }
    fields["hash"] = event_hash(fields)
    event = AuditEvent(**fields)
    session.add(event)
    head.seq, head.hash = fields["seq"], fields["hash"]
    session.flush()
    return event


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of walking the chain."""

    ok: bool
    events: int
    head_seq: int
    bad_seq: int | None = None
    problem: str | None = None


def _iter_events(session: Session, batch: int = 1000) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


def verify_chain(db: Database) -> VerifyResult:
    """Walk the whole chain; report the first seq at which it breaks."""
    with db.read() as session:
        head = session.get(AuditHead, 1)
        head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS_HASH)
        expected_seq, prev_hash, count = 1, GENESIS_HASH, 0
        for event in _iter_events(session):
            count += 1
            fields = {c.key: getattr(event, c.key) for c in AuditEvent.__table__.columns}
            if event.seq != expected_seq:
                if event.seq > expected_seq:
                    problem = f"event missing: expected seq {expected_seq}, next stored is {event.seq}"
                else:  # cannot happen with a primary key, kept for other stores
                    problem = f"duplicate seq {event.seq}"
                return VerifyResult(False, count, head_seq, expected_seq, problem)
            if event.prev_hash != prev_hash:
                return VerifyResult(
                    False, count, head_seq, event.seq, "prev_hash does not match the previous event's hash"
                )
            if event_hash(fields) != event.hash:
                return VerifyResult(False, count, head_seq, event.seq, "hash mismatch: the event was altered")
            prev_hash = event.hash
            expected_seq += 1
        last_seq = expected_seq - 1
        if last_seq != head_seq or prev_hash != head_hash:
            bad = min(last_seq, head_seq) + 1
            if last_seq < head_seq:
                problem = f"events after seq {last_seq} are missing: chain head is at seq {head_seq}"
            elif last_seq > head_seq:
                problem = f"events after the chain head (seq {head_seq}) were inserted"
            else:
                bad = last_seq
                problem = "last event does not match the chain head"
            return VerifyResult(False, count, head_seq, bad, problem)
        return VerifyResult(True, count, head_seq)


@dataclass(frozen=True)
class EventFilter:
    """Filters of ``GET /api/v1/audit/events``; all optional, combined with AND."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    outcome: str | None = None
    projects: tuple[str, ...] | None = None  # None: all projects
    after: int | None = None
    limit: int = 100
    applied: dict[str, Any] = field(default_factory=dict)


def event_query(f: EventFilter) -> Select[tuple[AuditEvent]]:
    stmt = select(AuditEvent)
    if f.since is not None:
        stmt = stmt.where(AuditEvent.ts >= f.since)
    if f.until is not None:
        stmt = stmt.where(AuditEvent.ts < f.until)
    for column, value in (
        (AuditEvent.actor, f.actor),
        (AuditEvent.action, f.action),
        (AuditEvent.resource_type, f.resource_type),
        (AuditEvent.resource_id, f.resource_id),
        (AuditEvent.outcome, f.outcome),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if f.projects is not None:
        stmt = stmt.where(AuditEvent.project.in_(f.projects))
    if f.after is not None:
        stmt = stmt.where(AuditEvent.seq > f.after)
    return stmt.order_by(AuditEvent.seq).limit(f.limit + 1)


def events_between(s: Session, since: datetime, until: datetime, project: str | None = None) -> list[AuditEvent]:
    """The events from ``since`` (inclusive) to ``until`` (exclusive), of one project or all, in chain order."""
    stmt = select(AuditEvent).where(AuditEvent.ts >= since, AuditEvent.ts < until)
    if project:
        stmt = stmt.where(AuditEvent.project == project)
    return list(s.scalars(stmt.order_by(AuditEvent.seq)))


def latest_events(s: Session, *, action: str, actor: str, project: str | None = None,
                  limit: int = 50) -> list[AuditEvent]:
    """One actor's newest events of one action (of one project, when given), newest first."""
    stmt = select(AuditEvent).where(AuditEvent.action == action, AuditEvent.actor == actor)
    if project is not None:
        stmt = stmt.where(AuditEvent.project == project)
    return list(s.scalars(stmt.order_by(AuditEvent.seq.desc()).limit(limit)))


def read_events(db: Database, ctx: AuditContext, f: EventFilter) -> tuple[list[AuditEvent], bool]:
    """Events matching ``f`` and whether more follow; the read itself is audited.

    The audit event of this read is appended in the same transaction, after
    the query, so it never appears in its own result page.
    """
    with db.transaction() as s:
        rows = list(s.scalars(event_query(f)))
        has_more = len(rows) > f.limit
        rows = rows[: f.limit]
        record(
            s, ctx, "audit.read", resource_type="audit_log",
            project=f.projects[0] if f.projects and len(f.projects) == 1 else None,
            details={"filters": f.applied, "returned": len(rows)},
        )
        return rows, has_more


def record_verification(db: Database, ctx: AuditContext, result: VerifyResult) -> bool:
    """Audit a verification; returns False when a tampered log refuses the append.

    A row forged beyond the chain head occupies the next seq, so every append
    fails (the appliance fails closed) until the log is restored. The verify
    result must still reach the person who asked, hence no exception here.
    """
    try:
        with db.transaction() as s:
            record(
                s, ctx, "audit.verify", resource_type="audit_log", outcome="success" if result.ok else "failure",
                reason=result.problem, details={"events": result.events, "bad_seq": result.bad_seq},
            )
    except IntegrityError:
        if result.ok:
            raise
        return False
    return True
