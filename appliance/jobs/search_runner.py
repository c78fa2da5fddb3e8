"""The search driver: runs each hyperparameter search job's trials as jobs of their own (issue 24).

A search job (``search`` set) trains nothing itself and is never claimed by the
scheduler. The driver, ticked from the scheduler's loop, takes each queued or
running one in turn under its row lock and:

- rebuilds its :class:`~appliance.jobs.search.SearchStudy` (Optuna) from the trial
  table kept in the job's ``search`` column, which is the truth across restarts
  and replicas;
- feeds each running trial's per-epoch validation losses (the trial's
  ``metrics`` events; trials train with ``validate_every_epoch``) to the
  pruner, and cancels a trial it prunes through the normal cancel path
  (:func:`appliance.jobs.service.request_cancel`, audited as the system with
  reason ``pruned``);
- tells the study how each ended trial ended (its final validation loss);
- at the wall-time limit cancels the running trials (reason ``max_seconds``);
- asks for new trials while the budget allows and fewer than the scheduler's
  concurrency are running, each a child job (same files, seed and memorisation
  tests; ``search_id`` and ``trial_number`` set) created in ``validating_files``
  and audited ``job.create`` with ``{"search_id", "trial", "params"}``: the
  scheduler runs it like any job, in its own sandboxed worker;
- once no trial runs and none may start, ends the search: succeeded with the
  best trial's adapter as its ``fine_tuned_model`` (audited with the trial
  table), or failed when no trial completed (cancelled when a person cancelled it).

A search the driver fails to drive :data:`MAX_DRIVE_FAILURES` times in a row
fails (``search_driver_failed``, audited) and its running trials are cancelled,
rather than staying ``running`` with nothing acting on it.

Every change is made and audited in one transaction per search. The other
trials' adapters stay published as ordinary fine-tuned models of the project,
each named by its trial's job; the search's own model is the best one's.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

from sqlalchemy import func, select

from appliance.audit.service import AuditContext, record
from appliance.db.base import Database, utcnow
from appliance.identity.service import project_name
from appliance.jobs.models import TERMINAL, FineTuningJob, JobEvent
from appliance.jobs.recipes import validate_method
from appliance.jobs.search import SearchSpec, SearchStudy, TrialRecord, spec_of
from appliance.jobs.service import add_event, new_job_id, request_cancel

log = logging.getLogger("appliance.jobs.search")

SEARCH = AuditContext(actor="system:search", auth_method="internal", origin_ip="local")
#: Failed drives in a row after which a search is failed instead of tried again.
MAX_DRIVE_FAILURES = 5


class SearchRunner:
    """Drives the hyperparameter search jobs of the database.

    Args:
        db: The database.
        concurrency: Trials of one search running at once (the scheduler's ``max_concurrent``).
        wake: Called after trials were created or cancelled, so that the scheduler acts at once.
        clock: Wall-clock seconds (``time.time``): a search's deadline survives a restart.
    """

    def __init__(self, db: Database, *, concurrency: int = 1, wake: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.concurrency, self.wake, self.clock = db, max(1, concurrency), wake, clock
        #: per search, what it looked like when last driven: unchanged, it is not driven again
        self._seen: dict[str, tuple[Any, ...]] = {}
        #: per search, drives that failed in a row
        self._failures: dict[str, int] = {}

    def tick(self) -> None:
        """Drive every queued or running search whose trials changed since it was last driven."""
        with self.db.read() as s:
            searches = list(s.execute(select(FineTuningJob.id, FineTuningJob.status, FineTuningJob.cancel_requested,
                                             FineTuningJob.started_at, FineTuningJob.search)
                                      .where(FineTuningJob.search.is_not(None),
                                             FineTuningJob.status.in_(("queued", "running")))))
            marks = {}
            for job_id, status, cancel, started, search in searches:
                trials = tuple(s.execute(
                    select(FineTuningJob.id, FineTuningJob.status, FineTuningJob.cancel_requested)
                    .where(FineTuningJob.search_id == job_id).order_by(FineTuningJob.id)))
                last_event = s.scalar(select(func.max(JobEvent.id)).join(
                    FineTuningJob, FineTuningJob.id == JobEvent.job_id).where(FineTuningJob.search_id == job_id))
                over = started is not None and self.clock() >= _timestamp(started) + search["max_seconds"]
                marks[job_id] = (status, cancel, trials, last_event, over)
        self._seen = {k: v for k, v in self._seen.items() if k in marks}
        self._failures = {k: v for k, v in self._failures.items() if k in marks}
        for job_id, mark in marks.items():
            if self._seen.get(job_id) == mark:
                continue
            try:
                if self._drive(job_id):  # a search locked by another transaction is looked at again next tick
                    self._seen[job_id] = mark
                self._failures.pop(job_id, None)
            except Exception as exc:  # the next tick tries again; the failure is logged for operators
                log.exception("driving a hyperparameter search failed", extra={"job_id": job_id})
                self._failures[job_id] = self._failures.get(job_id, 0) + 1
                if self._failures[job_id] >= MAX_DRIVE_FAILURES:
                    self._abandon(job_id, exc)

    def _abandon(self, job_id: str, exc: Exception) -> None:
        """Fail a search that cannot be driven, and cancel its running trials (audited, one transaction)."""
        try:
            with self.db.transaction() as s:
                job = s.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id).with_for_update())
                if job is None or job.status not in ("queued", "running"):
                    return
                project = project_name(s, job.project_id)
                for child in s.scalars(select(FineTuningJob).where(FineTuningJob.search_id == job_id)
                                       .with_for_update()):
                    if child.status not in TERMINAL and not child.cancel_requested:
                        request_cancel(s, SEARCH, child, project, reason="search_failed")
                job.status, job.finished_at, job.resumable, job.estimated_finish = "failed", utcnow(), False, None
                job.error = {"code": "search_driver_failed", "param": None,
                             "message": f"the search could not be driven ({type(exc).__name__}, "
                                        f"{MAX_DRIVE_FAILURES} times in a row; the server's log has the details): "
                                        "its running trials were cancelled, their jobs and models are kept"}
                add_event(s, job.id, f"Job failed: {job.error['message']}", level="error")
                record(s, SEARCH, "job.fail", outcome="failure", resource_type="fine_tuning_job",
                       resource_id=job.id, project=project, reason=job.error["code"],
                       details={"exception": type(exc).__name__})
            self._failures.pop(job_id, None)
            self.wake()
        except Exception:
            log.exception("failing an undrivable hyperparameter search failed", extra={"job_id": job_id})

    def _drive(self, job_id: str) -> bool:
        """Drive one search; False when its row was locked by another transaction (nothing was done)."""
        changed = False
        with self.db.transaction() as s:
            # The search first, then its trials: the lock order of every job transaction that touches both.
            job = s.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id).with_for_update(skip_locked=True))
            if job is None:
                return not s.scalar(select(func.count(FineTuningJob.id)).where(FineTuningJob.id == job_id))
            if job.status not in ("queued", "running"):
                return True
            project = project_name(s, job.project_id)
            children = {c.trial_number: c for c in s.scalars(
                select(FineTuningJob).where(FineTuningJob.search_id == job_id).with_for_update())}
            search = copy.deepcopy(job.search)
            table: list[dict[str, Any]] = search["trial_table"]
            if job.status == "queued":
                job.status, job.started_at = "running", utcnow()
                add_event(s, job.id, "Hyperparameter search started: its trials run as jobs of their own")
                record(s, SEARCH, "job.start", resource_type="fine_tuning_job", resource_id=job.id, project=project,
                       details={"search": True, "budget": {k: search[k] for k in
                                                           ("trials", "max_seconds", "sampler", "early_stopping")}})
            spec = spec_of(job.method_type, search)
            study = SearchStudy(spec, job.seed, started=_timestamp(job.started_at), clock=self.clock)
            study.restore([TrialRecord(r["number"], dict(r["params"]), r["state"], r["value"],
                                       {int(k): v for k, v in r["reports"].items()}) for r in table])
            for row in table:
                if row["state"] == "running":
                    changed |= self._follow(s, study, job, project, row, children.get(row["number"]))
            stop = ("cancelled" if job.cancel_requested else "max_seconds" if study.over_time() else None)
            if stop:
                for row in table:
                    child = children.get(row["number"])
                    if row["state"] == "running" and child is not None and child.status not in TERMINAL \
                            and not child.cancel_requested:
                        row["stopping"] = stop
                        request_cancel(s, SEARCH, child, project, reason=stop)
                        changed = True
            else:
                while sum(r["state"] == "running" for r in table) < self.concurrency:
                    proposal = study.ask()
                    if proposal is None:
                        break
                    child = self._trial(s, job, project, spec, proposal.number, proposal.params)
                    table.append({"number": proposal.number, "job_id": child.id if child else None,
                                  "params": proposal.params, "state": "running" if child else "failed",
                                  "value": None, "reports": {}, "reason": None if child else "invalid"})
                    if child is None:
                        study.tell(proposal.number, "failed")
                    changed = True
            if not any(r["state"] == "running" for r in table) and (job.cancel_requested or study.finished()):
                self._end(s, job, project, search, study, children)
            job.search = search
        if changed:
            self.wake()
        return True

    def _follow(self, s, study: SearchStudy, job: FineTuningJob, project: str, row: dict[str, Any],
                child: FineTuningJob | None) -> bool:
        """A running trial's new validation reports (to the pruner) and its end (to the study)."""
        changed = False
        if child is None:  # its job was deleted with its project; the trial cannot finish
            row["state"], row["reason"] = "failed", "lost"
            study.tell(row["number"], "failed")
            return True
        events = s.execute(select(JobEvent.id, JobEvent.data).where(
            JobEvent.job_id == child.id, JobEvent.type == "metrics", JobEvent.id > row.get("seen", 0))
            .order_by(JobEvent.id)).all()
        for event_id, data in events:
            row["seen"] = event_id
            epoch = _epoch_report(data)
            if epoch is None:
                continue
            prune = study.report(row["number"], epoch, data["valid_loss"])
            row["reports"][str(epoch)] = float(data["valid_loss"])
            if prune and not row.get("stopping") and child.status not in TERMINAL and not child.cancel_requested:
                row["stopping"] = "pruned"
                request_cancel(s, SEARCH, child, project, reason="pruned")
                add_event(s, job.id, f"Trial {row['number']} pruned after epoch {epoch}: its validation loss "
                          f"{data['valid_loss']:.4f} is worse than the median of earlier trials there",
                          data={"trial": row["number"], "epoch": epoch, "valid_loss": data["valid_loss"]})
                changed = True
        if child.status not in TERMINAL:
            return changed
        if child.status == "succeeded":
            study.tell(row["number"], "complete", (child.metrics or {}).get("valid_loss_after"))
        elif child.status == "cancelled" and row.get("stopping") == "pruned":
            study.tell(row["number"], "pruned")
        else:
            study.tell(row["number"], "failed")
        record_ = study.records[row["number"]]
        row["state"], row["value"] = record_.state, record_.value
        row["reason"] = (row.get("stopping") or "cancelled") if child.status == "cancelled" else (
            (child.error or {}).get("code") if child.status == "failed" else None)
        if record_.state == "failed" and child.status == "succeeded":
            row["reason"] = "no_validation_loss"
        value = f": validation loss {row['value']:.4f}" if row["value"] is not None else ""
        add_event(s, job.id, f"Trial {row['number']} ({child.id}) {record_.state}{value}",
                  data={"trial": row["number"], "state": record_.state, "valid_loss": row["value"],
                        "reason": row["reason"]})
        return True

    def _trial(self, s, job: FineTuningJob, project: str, spec: SearchSpec, number: int,
               params: dict[str, Any]) -> FineTuningJob | None:
        """The job of trial ``number``, created and audited; None when its values make no valid job."""
        method = {"type": job.method_type, job.method_type: {"hyperparameters": spec.trial_hyperparameters(params)}}
        try:
            method_type, hyperparameters = validate_method(method, base_kind="llm", seed=job.seed)
        except Exception as exc:  # each value was checked alone at creation; a combination may still be refused
            add_event(s, job.id, f"Trial {number} not run: its values make no valid job ({type(exc).__name__}: "
                      f"{str(exc)[:300]})", level="warn", data={"trial": number, "params": params})
            return None
        child = FineTuningJob(
            id=new_job_id(), project_id=job.project_id, created_by=job.created_by, model=job.model,
            training_file=job.training_file, validation_file=job.validation_file, suffix=job.suffix, seed=job.seed,
            method_type=method_type, hyperparameters=hyperparameters, status="validating_files",
            memorization=copy.deepcopy(job.memorization or {}), compute=copy.deepcopy(job.compute or {}),
            search_id=job.id, trial_number=number)
        s.add(child)
        s.flush()
        shown = ", ".join(f"{k}={_show(v)}" for k, v in params.items())
        add_event(s, child.id, f"Created fine-tuning job: {child.id}")
        add_event(s, child.id, f"Trial {number} of hyperparameter search {job.id}: {shown}",
                  data={"search_id": job.id, "trial": number, "params": params})
        add_event(s, job.id, f"Trial {number} created as job {child.id}: {shown}",
                  data={"trial": number, "job_id": child.id, "params": params})
        record(s, SEARCH, "job.create", resource_type="fine_tuning_job", resource_id=child.id, project=project,
               details={"search_id": job.id, "trial": number, "params": params, "model": job.model,
                        "method": method_type, "training_file": job.training_file,
                        "validation_file": job.validation_file, "hyperparameters": hyperparameters,
                        "seed": job.seed})
        return child

    def _end(self, s, job: FineTuningJob, project: str, search: dict[str, Any], study: SearchStudy,
             children: dict[int, FineTuningJob]) -> None:
        table = [{k: r[k] for k in ("number", "job_id", "params", "state", "value", "reason")}
                 for r in search["trial_table"]]
        job.finished_at, job.resumable, job.estimated_finish = utcnow(), False, None
        job.trained_tokens = sum(c.trained_tokens or 0 for c in children.values()) or None
        if job.cancel_requested:
            job.status = "cancelled"
            add_event(s, job.id, "Job cancelled")
            record(s, SEARCH, "job.cancelled", resource_type="fine_tuning_job", resource_id=job.id, project=project,
                   details={"trials": table})
            return
        best = study.best()
        if best is None:
            job.status = "failed"
            job.error = {"code": "search_no_trial_completed", "param": None,
                         "message": f"none of the search's {len(table)} trial(s) completed with a validation loss; "
                                    "see each trial's job for why"}
            add_event(s, job.id, f"Job failed: {job.error['message']}", level="error")
            record(s, SEARCH, "job.fail", outcome="failure", resource_type="fine_tuning_job", resource_id=job.id,
                   project=project, reason=job.error["code"], details={"trials": table})
            return
        winner = children[best.number]
        search["best_trial"] = best.number
        job.status, job.fine_tuned_model = "succeeded", winner.fine_tuned_model
        job.metrics, job.resolved, job.privacy = dict(winner.metrics or {}), dict(winner.resolved or {}), \
            dict(winner.privacy or {})
        add_event(s, job.id, f"Best trial {best.number} ({winner.id}), validation loss {best.value:.4f}: its model "
                  f"{winner.fine_tuned_model} is the search's model",
                  data={"trial": best.number, "job_id": winner.id, "valid_loss": best.value, "params": best.params})
        add_event(s, job.id, "The job has successfully completed")
        record(s, SEARCH, "job.succeed", resource_type="fine_tuning_job", resource_id=job.id, project=project,
               details={"fine_tuned_model": job.fine_tuned_model, "best_trial": best.number,
                        "best_job": winner.id, "trials": table})


def _epoch_report(data: Any) -> int | None:
    """The epoch a trial's metrics event reports a validation loss at the end of (not before or after training)."""
    if not isinstance(data, dict) or data.get("type") != "validation":
        return None
    loss, epoch, step, total = (data.get(k) for k in ("valid_loss", "epoch", "step", "total_steps"))
    if not isinstance(loss, (int, float)) or not math.isfinite(loss) or not isinstance(epoch, (int, float)):
        return None
    if not isinstance(step, int) or not isinstance(total, int) or not 0 < step < total:
        return None
    whole = round(epoch)
    return whole if abs(epoch - whole) < 1e-6 and whole >= 1 else None


def _timestamp(dt) -> float:
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _show(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
