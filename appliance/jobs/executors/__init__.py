"""Where a job's worker runs: the scheduler's one hook for launching, talking to and stopping it.

The scheduler owns the queue, the job's state and everything a worker
reports (all in the database); an executor only starts the worker and carries
frames (:mod:`appliance.jobs.wire`) to and from it:

* ``local`` (:class:`LocalExecutor`): a sandboxed process on this host that
  inherits two pipes (:mod:`appliance.jobs.sandbox`);
* ``ray`` (:class:`~appliance.jobs.executors.ray.RayExecutor`): a Ray job
  submitted through Ray's job submission API; its workers dial back over an
  encrypted tunnel (:mod:`appliance.jobs.tunnel`) and may be several
  data-parallel ranks under Ray Train.

Both run the same worker entry point, :mod:`appliance.jobs.worker`, with the
same start frame. ``APPLIANCE_EXECUTOR`` picks one (:func:`make_executor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from appliance.jobs.executors.local import LocalExecutor, LocalWorker
from appliance.jobs.streams import Opener
from appliance.settings import JobSettings

Frame = tuple[dict[str, Any], bytes]


class Worker(Protocol):
    """One launched run of one job, as the scheduler sees it."""

    def start(self, header: dict[str, Any], resume: Opener | None = None) -> None:
        """Deliver the start frame, then stream the checkpoint ``resume`` opens, if any; OSError when it cannot."""

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        """Deliver a control frame (``stop``); OSError when it cannot."""

    def read(self, timeout: float) -> Frame | None:
        """The next frame the worker sent, or ``None`` after ``timeout`` seconds."""

    def alive(self) -> bool:
        """False once the worker has ended and every frame it sent has been read."""

    def kill(self) -> None:
        """End the worker now (its job is recorded by the scheduler, not here)."""

    def reap(self) -> None:
        """Wait a little for the worker to end, then kill it."""

    def exit_detail(self) -> str:
        """How the worker ended, for a lost job's error, e.g. ``" (signal 9)"``."""

    def cleanup(self) -> None:
        """Release what the launch held (pipes, temp dir, tickets, connections)."""


class Executor(Protocol):
    """Starts workers; :attr:`max_workers` bounds a job's ``compute.workers``."""

    name: str
    max_workers: int

    def launch(self, job_id: str, compute: dict[str, Any], reads: Sequence[str | Path] = ()) -> Worker:
        """Start a worker for ``job_id``; the scheduler then sends it the start frame.

        ``reads``: the files the worker opens by path (its base model, its dataset blobs); a
        sandboxed worker sees only those of the host's files, beside its Python and code.
        """

    def close(self) -> None:
        """Release the executor's own resources (listeners, clients) on shutdown."""


def make_executor(settings: JobSettings, **local_options: Any) -> Executor:
    """The executor ``APPLIANCE_EXECUTOR`` names; ``local_options`` go to :class:`LocalExecutor`
    (the Ray executor takes its ``isolation`` and ``hide``: each rank sandboxes its worker alike)."""
    if settings.executor == "ray":
        from appliance.jobs.executors.ray import RayExecutor

        return RayExecutor(settings, isolation=local_options.get("isolation"), hide=local_options.get("hide", ()))
    return LocalExecutor(**local_options)


__all__ = ["Executor", "Frame", "LocalExecutor", "LocalWorker", "Worker", "make_executor"]
