"""Runs queued evaluations, one at a time, each in a sandboxed worker started like a training job's.

The runner claims the oldest queued evaluation under a lease (as the job scheduler claims jobs:
``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the writer lock on SQLite), starts
:mod:`appliance.evaluations.worker` through a local executor (the training workers' sandbox, limits
and isolation level), hands it the test file's data key and streams it the fine-tunes' adapter files,
and records what it reports: the figures in the row, the generations as an encrypted result file of
the project. A text evaluation's answers pass through the project's output guard before the result
file is written, as inference's answers do. An evaluation whose runner went away (its lease expired)
is failed, never left running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select

from appliance.audit.service import AuditContext, record
from appliance.catalog.archive import pack_files
from appliance.catalog.service import CatalogService
from appliance.db.base import Database, utcnow
from appliance.errors import ApplianceError, NotFoundError
from appliance.evaluations.models import Evaluation
from appliance.evaluations.task import FILENAME
from appliance.files.service import FileService, new_file_id
from appliance.identity.service import project_by_id, project_name
from appliance.inference.guard import OutputGuard
from appliance.jobs.executors import Executor, Worker
from appliance.jobs.streams import Receiver, StreamError
from appliance.jobs.wire import FrameError

if TYPE_CHECKING:
    from appliance.policy.service import PolicyService
    from appliance.storage.blobs import BlobWriter

log = logging.getLogger("appliance.evaluations")

SYSTEM = AuditContext(actor="system:evaluations", auth_method="internal", origin_ip="local")
#: The phases a worker's progress reports name, per model: a text model's loss pass, then its answers; an
#: image model's images.
PROGRESS_PHASES = frozenset({"loss", "answers", "images"})
LOST = {"code": "worker_lost", "param": None,
        "message": "the evaluation worker stopped unexpectedly (killed or the server restarted); run it again"}
#: Most bytes of a text evaluation's result file held in memory for the output guard (the prompts and 4 models'
#: answers of at most 50 records: a few MB).
MAX_TEXT_RESULT_BYTES = 64 * 1024 * 1024
#: What a stored answer reads where the project's output guard blocked it.
BLOCKED_ANSWER = "[withheld: the project's output policy blocked this answer]"


class TextResult(bytearray):
    """A text evaluation's result file as it arrives: kept in memory (bounded), never stored before its answers
    have passed the output guard."""

    def write(self, data: bytes) -> None:
        if len(self) + len(data) > MAX_TEXT_RESULT_BYTES:
            raise StreamError(f"the result file is larger than {MAX_TEXT_RESULT_BYTES} bytes")
        self.extend(data)

    def abort(self) -> None:
        self.clear()


@dataclass
class GuardedResult:
    """A text result file as it is stored: its answers guarded, encrypted in ``sink`` (finished when recorded).

    ``received`` and ``sha256`` describe the stored plaintext; ``guard`` is what the guard did (counts, no text).
    """

    sink: BlobWriter
    received: int
    sha256: str
    guard: dict[str, Any]

    def abort(self) -> None:
        self.sink.abort()


class EvaluationRunner:
    """Runs evaluations in sandboxed workers, one at a time.

    Args:
        db: The database.
        files: Test files in, result files out.
        catalog: Base models and the fine-tunes' adapter files.
        executor: Starts the workers (a :class:`~appliance.jobs.executors.LocalExecutor` of
            :mod:`appliance.evaluations.worker`).
        poll_s: Longest wait between looks at the queue.
        lease_s: How long a claimed evaluation stays this runner's without renewal.
        cancel_grace_s: Time a worker gets to stop before it is killed.
        busy: True while this host's training workers hold the device (the job scheduler's runs): a
            queued evaluation waits for them rather than share the device a job's memory plan counted on.
        policies: Each project's policy, for the output guard (default: the file service's).
        scanner: The shared intake scanner, for the output guard (default: the file service's).
    """

    def __init__(self, db: Database, files: FileService, catalog: CatalogService, executor: Executor, *,
                 poll_s: float = 0.5, lease_s: float = 60.0, cancel_grace_s: float = 10.0,
                 busy: Callable[[], bool] = lambda: False, policies: PolicyService | None = None,
                 scanner: Callable[[], Any] | None = None) -> None:
        self.db, self.files, self.catalog, self.executor, self.busy = db, files, catalog, executor, busy
        self.policies = policies or files.policies
        self.scanner = scanner or (lambda: files.scanner)
        self.poll_s, self.lease_s, self.cancel_grace_s = poll_s, lease_s, cancel_grace_s
        self.name = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: Worker | None = None
        #: the evaluation this runner is claiming or running (claiming: "" until the claim is made)
        self._current: str | None = None
        self._recovered_at = float("-inf")

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="evaluation-runner", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop claiming; kill a running worker (its evaluation is failed by whoever sees its lease expire)."""
        self._stopping.set()
        self._wake.set()
        if (worker := self._worker) is not None:
            worker.kill()
        if self._thread is not None:
            self._thread.join(timeout)

    def running(self) -> bool:
        """Whether an evaluation is being claimed or run here (the job scheduler waits meanwhile)."""
        return self._current is not None

    def recover(self) -> int:
        """Fail the running evaluations whose runner's lease has expired; return how many."""
        with self.db.transaction() as s:
            stale = list(s.scalars(select(Evaluation).where(
                Evaluation.status == "running",
                or_(Evaluation.lease_expires_at.is_(None), Evaluation.lease_expires_at <= utcnow()))
                .with_for_update(skip_locked=True)))
            for row in stale:
                self._end(s, row, "failed", error=dict(LOST))
        return len(stale)

    # -- loop ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if time.monotonic() - self._recovered_at >= self.lease_s / 6:
                    self._recovered_at = time.monotonic()
                    self.recover()
                self._current = ""  # said before looking at the scheduler, so that it holds back meanwhile
                claimed = None if self.busy() else self._claim()
                if claimed is not None:
                    self._current = claimed
                    self._run(claimed)
                    continue
            except Exception:  # keep running; the failure is logged for operators
                log.exception("evaluation runner tick failed")
            finally:
                self._current = None
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _claim(self) -> str | None:
        with self.db.read() as s:  # a look first: on SQLite a write transaction takes the database's one writer lock
            if s.scalar(select(Evaluation.id).where(Evaluation.status == "queued").limit(1)) is None:
                return None
        now = utcnow()
        with self.db.transaction() as s:
            row = s.scalar(select(Evaluation).where(Evaluation.status == "queued")
                           .order_by(Evaluation.created_at, Evaluation.id).limit(1).with_for_update(skip_locked=True))
            if row is None:
                return None
            row.status, row.worker, row.started_at = "running", self.name, now
            row.lease_expires_at = now + timedelta(seconds=self.lease_s)
            record(s, SYSTEM, "evaluation.start", resource_type="evaluation", resource_id=row.id,
                   project=project_name(s, row.project_id), details={"worker": self.name})
            return row.id

    # -- one run ------------------------------------------------------------
    def _start_message(self, evaluation_id: str) -> tuple[dict[str, Any], list[str]]:
        with self.db.read() as s:
            row = s.get(Evaluation, evaluation_id)
            project = project_by_id(s, row.project_id)
            base = self.catalog.base_model_in(s, row.base_model)
            datasets = self.files.dataset_keys(s, [("test", row.file)])
            isolation = getattr(getattr(self.executor, "isolation", None), "value", None)
            models = [{"id": m, "adapter": f"a{i}" if m.startswith("ft:") else None} for i, m in enumerate(row.models)]
            # Image models are scored with the store's CLIP evaluator (CLIP-T), the one image jobs use, if any.
            clip = self.catalog.evaluators_in(s).get("clip") if row.kind == "diffusion" else None
            start = {"type": "start", "evaluation_id": row.id, "project": project.name, "model_dir": base.path,
                     "kind": row.kind, "datasets": datasets, "models": models, "samples": row.samples,
                     "max_tokens": row.max_tokens, "images": row.images,
                     "evaluators": {"clip": clip.to_dict()} if clip else {}, "isolation": isolation}
        return start, [base.path, *(e["path"] for e in start["evaluators"].values()), *(d["path"] for d in datasets)]

    def _run(self, evaluation_id: str) -> None:
        outcome: tuple[str, dict[str, Any]] = ("lost", {})
        receiver, stored, isolation = Receiver(), None, None
        worker = None
        try:
            start, reads = self._start_message(evaluation_id)
            if not self._file_live(start):
                outcome = ("error", {"code": "invalid_file", "param": "file", "message": "the test file is no "
                                     "longer available"})
                return
            if (problem := self._model_problem(start)) is not None:
                outcome = ("error", problem)
                return
            adapters = pack_files({f"{e['adapter']}/{name}": data for e in start["models"] if e["adapter"]
                                   for name, data in self.catalog.adapter_files(e["id"]).items()})
            has_adapters = any(e["adapter"] for e in start["models"])
            worker = self._worker = self.executor.launch(evaluation_id, {}, reads)
            # Decrypted in memory and streamed (serving does the same with the adapters it loads).
            worker.start(start, (lambda: [adapters]) if has_adapters else None)
            project, text = start["project"], start["kind"] != "diffusion"
            start, adapters = {}, b""  # the data key and the adapters' weights: out of memory once sent
            renewed, stop_sent = time.monotonic(), None
            while not self._stopping.is_set():
                frame = worker.read(timeout=1.0)
                if frame is None and not worker.alive():
                    break
                if frame is not None:
                    header, payload = frame
                    kind = header.get("type")
                    if kind == "event" and header.get("event_type") == "isolation":
                        isolation = header.get("data")  # how the worker found itself shut in: the audit says
                    elif kind == "event" and header.get("event_type") == "progress":
                        self._progress(evaluation_id, header.get("data"))
                    elif kind == "begin":  # text: guarded before it is stored; images: stored as they come
                        receiver.begin(header, TextResult() if text else
                                       self.files.blobs.create(new_file_id(), project, "file"))
                    elif kind == "chunk":
                        receiver.chunk(payload)
                    elif kind == "end":
                        stored = receiver.end(header)
                    elif kind in ("result", "cancelled", "error"):
                        outcome = (kind, header)
                        break
                if time.monotonic() - renewed >= self.lease_s / 6:
                    renewed = time.monotonic()
                    if not self._renew(evaluation_id):
                        outcome = ("taken", {})
                        break
                cancel = self._cancel_requested(evaluation_id)
                if cancel and stop_sent is None:
                    stop_sent = time.monotonic()
                    worker.send({"type": "stop"})
                elif cancel and time.monotonic() - stop_sent > self.cancel_grace_s:
                    worker.kill()
            if outcome[0] == "result" and stored is not None and isinstance(stored.sink, TextResult):
                outcome, stored = self._guard_result(evaluation_id, outcome, stored)
        except (StreamError, FrameError) as exc:
            log.warning("an evaluation worker's stream broke", extra={"evaluation_id": evaluation_id,
                                                                       "error": str(exc)[:300]})
            outcome = ("error", {"code": "transfer_failed", "param": None,
                                 "message": "the result from the worker did not arrive intact; run it again"})
        except Exception as exc:
            log.exception("running an evaluation failed", extra={"evaluation_id": evaluation_id})
            outcome = ("error", {"code": "worker_start_failed", "param": None,
                                 "message": f"could not run the worker: {type(exc).__name__}"})
        finally:
            if worker is not None and outcome[0] == "taken":
                worker.kill()
            elif worker is not None:
                worker.reap()
            kept = False
            try:
                kept = self._finish(evaluation_id, outcome, stored if outcome[0] == "result" else None, isolation)
            except Exception:
                log.exception("recording the end of an evaluation failed", extra={"evaluation_id": evaluation_id})
            if stored is not None and not kept:
                stored.abort()
            receiver.abandon()
            if worker is not None:
                worker.cleanup()
            self._worker = None

    def _guard_result(self, evaluation_id: str, outcome: tuple[str, dict[str, Any]],
                      incoming: Any) -> tuple[tuple[str, dict[str, Any]], GuardedResult | None]:
        """The outcome and the result file to store, its answers guarded; an error and nothing when that fails."""
        try:
            return outcome, self._guarded(evaluation_id, bytes(incoming.sink))
        except ValueError as exc:
            log.warning("an evaluation worker sent a malformed result file", extra={"evaluation_id": evaluation_id,
                                                                                  "error": str(exc)[:300]})
            return ("error", {"code": "invalid_result", "param": None, "message": "the worker's result file is "
                              "not an evaluation result; run it again"}), None
        except Exception as exc:  # the scanner or the policy: nothing unguarded is stored
            log.exception("guarding an evaluation's answers failed", extra={"evaluation_id": evaluation_id})
            reason = exc.message if isinstance(exc, ApplianceError) else type(exc).__name__
            return ("error", {"code": "output_guard_failed", "param": None, "message": "the answers could not "
                              f"be passed through the project's output guard ({reason}); nothing was stored"}), None
        finally:
            incoming.sink.clear()

    def _guarded(self, evaluation_id: str, data: bytes) -> GuardedResult:
        """A text result file with every answer passed through the project's output guard, then encrypted.

        As inference guards an answer (:meth:`OutputGuard.check`, the project's policy): an answer is stored
        redacted where the policy redacts, and as :data:`BLOCKED_ANSWER` where it blocks. The prompts and
        references are the test file's stored records, already under the policy. The figures (exact match,
        token F1) were computed in the worker on the raw answers, which are stored nowhere.

        Raises:
            ValueError: ``data`` is not an evaluation result file.
        """
        document = json.loads(data)
        samples = document.get("samples") if isinstance(document, dict) else None
        if not isinstance(samples, list) or not all(isinstance(s, dict) and isinstance(s.get("answers"), dict)
                                                    for s in samples):
            raise ValueError("expected an object whose `samples` each have `answers`")
        with self.db.read() as s:
            project = project_by_id(s, s.get(Evaluation, evaluation_id).project_id)
        guard = OutputGuard(self.scanner(), self.policies.effective(project))
        for sample in samples:
            answers = sample["answers"]
            for model, answer in answers.items():
                if isinstance(answer, str):
                    safe, refused = guard.check(answer)
                    answers[model] = BLOCKED_ANSWER if refused else safe
        guarded = json.dumps(document, ensure_ascii=False).encode()
        writer = self.files.blobs.create(new_file_id(), project.name, "file")
        try:
            writer.write(guarded)
        except BaseException:
            writer.abort()
            raise
        return GuardedResult(writer, len(guarded), hashlib.sha256(guarded).hexdigest(), guard.report.to_dict())

    def _file_live(self, start: dict[str, Any]) -> bool:
        with self.db.read() as s:
            return self.files.is_live(s, s.get(Evaluation, start["evaluation_id"]).file)

    def _model_problem(self, start: dict[str, Any]) -> dict[str, Any] | None:
        """Why a fine-tune of the evaluation cannot run, if one cannot: deleted (withdrawn, expired) since it was
        queued, or another project's (queued before creation refused those)."""
        with self.db.read() as s:
            project_id = s.get(Evaluation, start["evaluation_id"]).project_id
        for i, entry in enumerate(start["models"]):
            if not entry["adapter"]:
                continue
            try:
                adapter = self.catalog.get_adapter(None, entry["id"])
            except NotFoundError:
                return {"code": "model_not_found", "param": f"models[{i}]",
                        "message": f"model {entry['id']!r} is no longer available (deleted or withdrawn)"}
            if adapter.row.project_id != project_id:
                return {"code": "model_not_found", "param": f"models[{i}]",
                        "message": f"model {entry['id']!r} is not a fine-tune of the evaluation's project"}
        return None

    def _renew(self, evaluation_id: str) -> bool:
        with self.db.transaction() as s:
            row = s.get(Evaluation, evaluation_id, with_for_update=True)
            if row is None or row.status != "running" or row.worker != self.name:
                return False
            row.lease_expires_at = utcnow() + timedelta(seconds=self.lease_s)
            return True

    def _progress(self, evaluation_id: str, data: Any) -> None:
        """Keep how far the worker is on the row (counts only, checked: the worker is not trusted to send them)."""
        progress = _checked_progress(data)
        if progress is None:
            return
        with self.db.transaction() as s:
            row = s.get(Evaluation, evaluation_id, with_for_update=True)
            if row is not None and row.status == "running" and row.worker == self.name:
                row.progress = progress

    def _cancel_requested(self, evaluation_id: str) -> bool:
        with self.db.read() as s:
            return bool(s.scalar(select(Evaluation.cancel_requested).where(Evaluation.id == evaluation_id)))

    def _finish(self, evaluation_id: str, outcome: tuple[str, dict[str, Any]], stored: Any,
                isolation: dict[str, Any] | None = None) -> bool:
        """Record how the run ended; whether ``stored`` (the result file) was kept (else the caller discards it).

        A test file or fine-tune deleted while it ran keeps nothing of it: the evaluation fails
        (``test_file_deleted``, ``model_deleted``). The evaluation's row is locked first: a deletion locks it
        too (:meth:`EvaluationService.erase_results_of_file`), so either the deletion sees the result file
        stored here and shreds it, or this sees the deletion.
        """
        kind, header = outcome
        kept = False
        with self.db.transaction() as s:
            row = s.get(Evaluation, evaluation_id, with_for_update=True)
            if row is None or row.status != "running" or row.worker != self.name:
                return False  # taken over: its new owner records it
            erased = self._erased_meanwhile(s, row) if kind in ("result", "cancelled") else None
            if erased is not None:
                self._end(s, row, "failed", error=erased)
            elif kind == "result":
                row.results = _checked_results(header.get("results"))
                row.fidelity = _checked_fidelity(header.get("fidelity")) if row.kind == "diffusion" else None
                if stored is not None:
                    self._store_result_file(s, row, stored)
                    kept = True
                self._end(s, row, "succeeded", isolation=isolation)
            elif kind == "cancelled" or row.cancel_requested:
                self._end(s, row, "cancelled")
            elif kind == "error":
                if header.get("trace"):
                    log.error("evaluation worker failed", extra={"evaluation_id": evaluation_id,
                                                                 "trace": header["trace"]})
                self._end(s, row, "failed", error={"code": header.get("code", "worker_error"),
                                                   "message": str(header.get("message", ""))[:2000],
                                                   "param": header.get("param")})
            else:
                self._end(s, row, "failed", error=dict(LOST))
        return kept

    def _erased_meanwhile(self, s, row: Evaluation) -> dict[str, Any] | None:
        """The error of an evaluation whose test file or one of whose fine-tunes was deleted while it ran."""
        if not self.files.is_live(s, row.file):
            return {"code": "test_file_deleted", "param": "file",
                    "message": f"the test file {row.file} was deleted while the evaluation ran: nothing of the "
                               "run was kept"}
        for i, model in enumerate(row.models):
            if model.startswith("ft:") and not self.catalog.is_live_adapter(s, model):
                return {"code": "model_deleted", "param": f"models[{i}]",
                        "message": f"model {model!r} was deleted while the evaluation ran: nothing of the run "
                                   "was kept"}
        return None

    def _store_result_file(self, s, row: Evaluation, incoming: Any) -> None:
        writer = incoming.sink
        s.add(writer.finish())
        self.files.add_result_file(s, file_id=writer.object_id, project_id=row.project_id,
                                   filename=f"{row.id}-{FILENAME}", size=incoming.received, sha256=incoming.sha256,
                                   created_by=row.created_by, generated_by=row.id)
        row.result_file = writer.object_id
        guard = {"guard": incoming.guard} if isinstance(incoming, GuardedResult) else {}
        record(s, SYSTEM, "file.result", resource_type="file", resource_id=writer.object_id,
               project=project_name(s, row.project_id),
               details={"evaluation_id": row.id, "name": FILENAME, "bytes": incoming.received, **guard})

    @staticmethod
    def _end(s, row: Evaluation, status: str, *, error: dict[str, Any] | None = None,
             isolation: dict[str, Any] | None = None) -> None:
        row.status, row.finished_at, row.lease_expires_at, row.error = status, utcnow(), None, error
        row.progress = None
        action = {"succeeded": "evaluation.succeed", "cancelled": "evaluation.cancelled"}.get(status, "evaluation.fail")
        record(s, SYSTEM, action, outcome="failure" if status == "failed" else "success",
               resource_type="evaluation", resource_id=row.id, project=project_name(s, row.project_id),
               reason=error["code"] if error else None,
               details={"results": row.results, "worker_isolation": isolation} if status == "succeeded" else None)


def _checked_results(data: Any) -> list[dict[str, Any]]:
    """The worker's figures as the row keeps them: a list of dicts, a figure that is not finite as None.

    The worker maps NaN (a loss with no target tokens: not measured) to None itself; this holds for any
    worker, as the row and the audit event are JSON and PostgreSQL's ``json`` refuses NaN and infinities.
    """
    return [finite_or_none(r) for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def finite_or_none(value: Any) -> Any:
    """``value`` with every float in it that is not finite (NaN, infinities) as None, in lists and dicts too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_none(item) for item in value]
    return value


def _checked_fidelity(data: Any) -> dict[str, Any] | None:
    """How an image evaluation's figures were measured, as the row keeps it (a sentence and evaluator names)."""
    if not isinstance(data, dict) or not isinstance(data.get("metric"), str):
        return None
    evaluators = data.get("evaluators")
    if not (isinstance(evaluators, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in evaluators.items())):
        evaluators = None
    return {"metric": data["metric"][:2000], "evaluators": evaluators}


def _checked_progress(data: Any) -> dict[str, Any] | None:
    """A progress report as the row keeps it, or None when it is not one (a field missing or of another kind)."""
    if not isinstance(data, dict) or data.get("phase") not in PROGRESS_PHASES:
        return None
    counts = {key: data.get(key) for key in ("model", "models", "done", "total")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 for v in counts.values()):
        return None
    left = data.get("seconds_left")
    if not (isinstance(left, (int, float)) and not isinstance(left, bool) and 0 <= left < 1e7):
        left = None
    return {**counts, "phase": data["phase"], "seconds_left": left}
