"""The local executor: one sandboxed worker process per job on this host, talking over two pipes."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.jobs import streams
from appliance.jobs.isolation import IsolationLevel
from appliance.jobs.sandbox import SandboxedProcess, WorkerLimits, spawn
from appliance.jobs.wire import FrameReader, write_frame


class LocalWorker:
    """A :class:`~appliance.jobs.sandbox.SandboxedProcess` behind the executor's worker protocol."""

    def __init__(self, process: SandboxedProcess) -> None:
        self.process = process
        self.proc = process.proc  # tests and operators signal the worker's process group by this pid
        self._reader = FrameReader(process.from_child)
        self._write_lock = threading.Lock()  # a stop may be sent while the resume checkpoint streams

    def start(self, header: dict[str, Any], resume: streams.Opener | None = None) -> None:
        if self.process.fds and header.get("datasets"):  # the blobs it was given as descriptors, not paths
            header = dict(header, datasets=self.process.by_descriptor(header["datasets"]))
        self.send(dict(header, resume_stream=resume is not None))
        if resume is not None:
            streams.send(self.send, {"kind": "resume"}, resume())

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        with self._write_lock:
            write_frame(self.process.to_child, header, payload)

    def read(self, timeout: float) -> tuple[dict[str, Any], bytes] | None:
        return self._reader.read(timeout=timeout)

    def alive(self) -> bool:
        return not self._reader.eof and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self, timeout: float = 10.0) -> None:
        try:
            self.proc.wait(timeout)
        except Exception:
            self.kill()
            self.proc.wait()

    def exit_detail(self) -> str:
        code = self.proc.returncode
        return f" (signal {-code})" if code is not None and code < 0 else f" (exit {code})"

    def cleanup(self) -> None:
        self.process.cleanup()


@dataclass
class LocalExecutor:
    """Sandboxed processes on this host (:func:`appliance.jobs.sandbox.spawn`): one worker per job."""

    worker_module: str = "appliance.jobs.worker"
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    isolation: IsolationLevel = IsolationLevel.SANDBOX
    #: kept out of a sandboxed worker's view (the appliance's home: key file, database, storage)
    hide: tuple[Path, ...] = ()
    name: str = "local"
    max_workers: int = 1

    def launch(self, job_id: str, compute: dict[str, Any],  # noqa: ARG002 - one process per job
               reads: Sequence[str | Path] = ()) -> LocalWorker:
        # In the sandbox, files (the dataset blobs) come in as open descriptors, directories (the base
        # model) as read-only binds; at the weaker levels the worker opens them by path.
        sandboxed = self.isolation is IsolationLevel.SANDBOX
        files = [p for p in reads if Path(p).is_file()] if sandboxed else []
        dirs = [p for p in reads if not Path(p).is_file()] if sandboxed else []
        return LocalWorker(spawn(self.worker_module, limits=self.limits, isolation=self.isolation,
                                 reads=dirs, files=files, hide=self.hide))

    def close(self) -> None:
        pass
