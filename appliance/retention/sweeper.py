"""The retention sweeper: crypto-shreds what outlived its project's retention periods.

A project's policy (its own, else the default policy) may say how long its
data is kept::

    retention:
      datasets: 90d     # uploaded files, counted from the upload
      adapters: 365d    # fine-tuned adapters, counted from their publication

A missing key keeps forever. The policy in force at the sweep decides, not
the one in force at the upload: shortening a period takes effect at the next
sweep, lengthening it spares whatever has not been shredded yet. Files a job
produced (``fine-tune-results``: metrics, not training data) are not datasets.

An expired item is deleted through the same service code as a user's
deletion (:meth:`FileService.shred`, :meth:`CatalogService.shred_adapter`):
its data key is destroyed and its ``file.delete`` / ``adapter.delete`` event
(actor ``system:retention``, details ``reason: retention``, the policy hash,
the period and when it expired) is written in the same transaction, then the
ciphertext is removed. As with a user's deletion, adapters trained on an
expired dataset are withdrawn with it: a model carries its training data, so
it never outlives that data's retention. Likewise the result files of
evaluations that read an expired test file, or ran an expired or withdrawn
adapter, are shredded in the same transaction (the evaluations package's
hooks on :attr:`FileService.on_shred` and :attr:`CatalogService.on_shred`):
they hold copies of its records or generations.

Several replicas may sweep at once: each item is shredded in its own
transaction under ``FOR UPDATE SKIP LOCKED`` (on SQLite, ``BEGIN IMMEDIATE``
serialises writers), so an item another sweeper holds is skipped, and one
already shredded is no longer a candidate. A sweep is therefore idempotent.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from appliance.audit.service import AuditContext
from appliance.catalog.service import CatalogService
from appliance.db.base import Database, utcnow
from appliance.errors import ApplianceError
from appliance.files.service import FileService
from appliance.identity.service import all_projects
from appliance.policy import format_duration
from appliance.policy.service import PolicyService

log = logging.getLogger("appliance.retention")

#: Who retention deletions are attributed to in the audit log.
SYSTEM = AuditContext(actor="system:retention", auth_method="internal", origin_ip="local")
Kind = Literal["dataset", "adapter"]


@dataclass(frozen=True)
class Expired:
    """A dataset or adapter older than its project's retention period.

    Attributes:
        kind: ``dataset`` or ``adapter``.
        id: File id or adapter id.
        project: Project name.
        created_at: Upload (dataset) or publication (adapter) time.
        expired_at: ``created_at`` plus the period: when it should go.
        period: The period, as the policy writes it (``90d``).
        policy_hash: Content hash of the policy that set the period.
    """

    kind: Kind
    id: str
    project: str
    created_at: datetime
    expired_at: datetime
    period: str
    policy_hash: str

    @property
    def reason(self) -> str:
        """The audit event's ``reason``."""
        return f"retention period of {self.period} expired"

    def details(self) -> dict[str, Any]:
        """What the audit event records about the retention decision."""
        return {"reason": "retention", "policy_hash": self.policy_hash, "retention_period": self.period,
                "expired_at": self.expired_at.isoformat()}


@dataclass
class SweepResult:
    """What one pass shredded (or, in a dry run, would shred).

    Attributes:
        dry_run: Nothing was changed.
        expired: The expired items shredded by this pass (or found, in a dry run).
        withdrawn: ``(adapter id, file id)``: adapters withdrawn because they were trained on an
            expired dataset (in a dry run: those that would be).
        skipped: Expired items another sweeper or a user deleted first.
        errors: One line per project or item that failed; the rest of the pass went on.
    """

    dry_run: bool
    expired: list[Expired] = field(default_factory=list)
    withdrawn: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[Expired] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def find_expired(db: Database, policies: PolicyService, now: datetime,
                 errors: list[str] | None = None) -> list[Expired]:
    """Live datasets and adapters older than the retention periods of their project's current policy.

    Args:
        db: The database.
        policies: Resolves each project's policy (its own, else the default).
        now: The time to judge expiry at (aware UTC).
        errors: Receives a line per project whose policy cannot be read (that project is skipped).
    """
    with db.read() as s:
        projects = all_projects(s)
    found: list[Expired] = []
    for project in projects:
        try:
            policy = policies.effective(project)
        except ApplianceError as exc:
            line = f"project {project.name!r}: its policy cannot be read, nothing of it was swept: {exc.message}"
            log.error("retention sweep skipped a project", extra={"project": project.name})
            if errors is not None:
                errors.append(line)
            continue
        periods: dict[Kind, timedelta | None] = {"dataset": policy.retention.datasets,
                                                 "adapter": policy.retention.adapters}
        with db.read() as s:
            for kind, period in periods.items():
                if period is None:
                    continue
                older = (FileService.datasets_created_before if kind == "dataset"
                         else CatalogService.adapters_created_before)
                for item_id, created_at in older(s, project.id, now - period):
                    found.append(Expired(kind, item_id, project.name, created_at, created_at + period,
                                         format_duration(period), policy.content_hash))
    return found


class RetentionSweeper:
    """Enforces the retention periods of project policies, once per call or every ``interval_s`` seconds.

    Args:
        db: The database.
        policies: Each project's policy.
        files: Deletes datasets (and, through its hooks, the adapters trained on them).
        catalog: Deletes adapters.
        interval_s: Seconds between sweeps of the background thread; 0 disables it.
    """

    def __init__(self, db: Database, policies: PolicyService, files: FileService, catalog: CatalogService,
                 interval_s: int) -> None:
        self.db, self.policies, self.files, self.catalog = db, policies, files, catalog
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, *, now: datetime | None = None, dry_run: bool = False) -> SweepResult:
        """One pass: shred every expired item (adapters first, then datasets).

        Args:
            now: The time to judge expiry at (default: the current time).
            dry_run: Only report what would be shredded and withdrawn; change nothing.
        """
        result = SweepResult(dry_run=dry_run)
        expired = find_expired(self.db, self.policies, now or utcnow(), result.errors)
        # Adapters first, so one that expired on its own is recorded with its own reason.
        expired.sort(key=lambda e: e.kind != "adapter")
        expiring_adapters = {e.id for e in expired if e.kind == "adapter"}
        for item in expired:
            try:
                if dry_run:
                    result.expired.append(item)
                    if item.kind == "dataset":
                        withdrawn = expiring_adapters | {a for a, _ in result.withdrawn}
                        result.withdrawn += [(a, item.id) for a in self.catalog.trained_on(item.id)
                                             if a not in withdrawn]
                    continue
                shredded = self._shred_adapter(item) if item.kind == "adapter" else self._shred_dataset(item, result)
                (result.expired if shredded else result.skipped).append(item)
            except Exception as exc:  # one broken item must not stop the others from being shredded
                log.exception("retention could not shred an item", extra={"kind": item.kind, "id": item.id})
                result.errors.append(f"{item.kind} {item.id}: {exc}")
        if result.expired and not dry_run:
            log.info("retention sweep shredded expired data", extra={
                "datasets": sum(e.kind == "dataset" for e in result.expired),
                "adapters": sum(e.kind == "adapter" for e in result.expired),
                "withdrawn": len(result.withdrawn)})
        return result

    def _shred_dataset(self, item: Expired, result: SweepResult) -> bool:
        dependents = self.catalog.trained_on(item.id)
        with self.db.transaction() as s:
            row = self.files.lock_live(s, item.id)
            if row is None:  # another sweeper holds it, or it is gone
                return False
            self.files.shred(s, SYSTEM, row, item.project, reason=item.reason, details=item.details())
        self.files.finish_shred(item.id, SYSTEM)  # removes the ciphertext, withdraws the adapters trained on it
        remaining = set(self.catalog.trained_on(item.id))
        result.withdrawn += [(a, item.id) for a in dependents if a not in remaining]
        return True

    def _shred_adapter(self, item: Expired) -> bool:
        self.catalog.unload(item.id)  # as a user's deletion: out of serving before the key goes
        with self.db.transaction() as s:
            row = self.catalog.lock_live_adapter(s, item.id)
            if row is None:
                return False
            object_id = row.object_id
            self.catalog.shred_adapter(s, SYSTEM, row, item.project, reason=item.reason, details=item.details())
        self.catalog.blobs.remove(object_id)
        return True

    # -- background thread ----------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # keep sweeping; the failure is logged for operators
                log.exception("retention sweep failed")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Sweep now, then every ``interval_s`` seconds, in a daemon thread (not at all if 0)."""
        if self.interval_s > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="retention-sweeper", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
