"""Launch a worker process isolated from the network and the host's secrets.

Each worker gets:

* the isolation level ``APPLIANCE_WORKER_ISOLATION`` names (:mod:`appliance.jobs.isolation`):
  by default a bubblewrap sandbox with its own namespaces, a file system view of only what it
  needs and a seccomp filter; failing closed when that cannot be built;
* a scrubbed environment (no ``APPLIANCE_*``, no proxies, no tokens) with the offline switches
  of every ML library;
* limits on open files, memory and file size, and no core dumps (a core would be plaintext
  training data on disk);
* a private temporary directory on tmpfs, removed when it exits (and, should
  the control plane itself be killed first, by the next one to start:
  :func:`sweep_orphaned_tmpdirs`);
* two inherited pipes, the only channel for its input (spec and data keys)
  and output (events, checkpoints, artefacts): never argv, env or disk.
"""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.jobs.isolation import (
    IsolationLevel,
    allocate_worker_uid,
    bwrap_argv,
    bwrap_path,
    gpu_devices,
    grant_read,
    is_worker_uid,
    network_isolation_prefix,
    network_prefix,
    release_worker_uid,
    seccomp_program,
)

#: Variables passed through to workers; everything else is dropped.
_PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "PYTHONPATH")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}

__all__ = ["OFFLINE_ENV", "SandboxedProcess", "WorkerLimits", "network_isolation_prefix", "spawn",
           "sweep_orphaned_tmpdirs"]


@dataclass
class WorkerLimits:
    """Resource limits applied in the child before it runs."""

    max_open_files: int = 4096
    #: RLIMIT_DATA; by default the host's physical memory (a runaway allocation fails in the worker
    #: instead of pushing the host into swap and the OOM killer's choice); None: unlimited
    max_memory_bytes: int | None = field(default_factory=lambda: _physical_memory())
    #: RLIMIT_FSIZE: the largest file the worker may write (its tmpfs holds only scratch files)
    max_file_bytes: int | None = 64 << 30
    #: RLIMIT_NPROC: processes and threads of a sandboxed worker running under its own host uid
    #: (a server running as root); a fork bomb stops there. Not applied otherwise: root is exempt from
    #: it, and under a non-root server it would count the server's own threads too.
    max_processes: int | None = 4096
    nice: int = 5


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


@dataclass
class SandboxedProcess:
    """A running worker and the parent's ends of its pipes."""

    proc: subprocess.Popen
    to_child: int
    from_child: int
    tmpdir: Path
    #: the isolation level it runs at (an :class:`~appliance.jobs.isolation.IsolationLevel` value)
    isolation: str
    argv: list[str] = field(default_factory=list)
    #: files passed in as open descriptors: path -> the descriptor's number in the worker
    fds: dict[str, int] = field(default_factory=dict)
    #: the host uid the worker runs as, when it has one of its own
    uid: int | None = None
    #: "none" (a network namespace of its own) or "shared" (the host's network)
    network: str = "none"

    def by_descriptor(self, datasets: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A start frame's dataset entries with the blobs it was given as descriptors named by ``fd``, not path."""
        return [{k: v for k, v in d.items() if k != "path"} | {"fd": self.fds[d["path"]]}
                if d.get("path") in self.fds else d for d in datasets]

    @property
    def isolated(self) -> bool:
        return self.isolation != IsolationLevel.NONE.value

    def cleanup(self) -> None:
        for fd in (self.to_child, self.from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.uid is not None:
            release_worker_uid(self.uid)
            self.uid = None


TMPDIR_PREFIX = "appliance-job-"
_OWNER_FILE = ".owner"


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _process_identity(pid: int) -> str | None:
    """``"PID STARTTIME"`` for a live process (a reused pid reads differently), else None."""
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the parenthesised command name, which may hold spaces.
    return f"{pid} {line.rsplit(')', 1)[1].split()[19]}"


def _cwds_in_use() -> set[Path]:
    cwds = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwds.add(Path(os.readlink(proc / "cwd")))
        except OSError:
            continue
    return cwds


def sweep_orphaned_tmpdirs(root: str | Path | None = None) -> list[Path]:
    """Remove the worker directories left by a control plane that was killed; return them.

    A directory is orphaned when the process that created it is gone and no
    process still works in it. Directories of other users, of live control
    planes (several may share a host) and of still-running workers are kept.
    Runs when a scheduler starts.
    """
    base = Path(root) if root is not None else Path(_tmp_root() or tempfile.gettempdir())
    if not Path("/proc/self/stat").exists():
        return []  # no way to tell a live owner from a dead one: keep everything
    removed: list[Path] = []
    in_use: set[Path] | None = None
    for tmpdir in sorted(base.glob(f"{TMPDIR_PREFIX}*")):
        try:
            info = tmpdir.lstat()  # a symlink is not ours to follow
            if not stat.S_ISDIR(info.st_mode) or not (info.st_uid == os.geteuid() or is_worker_uid(info.st_uid)):
                continue
            try:
                owner = (tmpdir / _OWNER_FILE).read_text().strip()
            except FileNotFoundError:
                owner = ""  # created by an older version, or killed before writing it
        except OSError:
            continue  # gone meanwhile, or unreadable: not ours to judge
        pid = owner.split()[0] if owner else ""
        if pid.isdigit() and _process_identity(int(pid)) == owner:
            continue
        if not owner and time.time() - info.st_mtime < 60:
            continue  # maybe just created: spawn writes the owner right after mkdtemp
        in_use = _cwds_in_use() if in_use is None else in_use
        if any(cwd == tmpdir or tmpdir in cwd.parents for cwd in in_use):
            continue
        shutil.rmtree(tmpdir, ignore_errors=True)
        removed.append(tmpdir)
    return removed


def spawn(
    module: str,
    *,
    limits: WorkerLimits | None = None,
    extra_env: dict[str, str] | None = None,
    isolation: IsolationLevel | str = IsolationLevel.SANDBOX,
    reads: Sequence[str | Path] = (),
    files: Sequence[str | Path] = (),
    hide: Sequence[str | Path] = (),
    gpu: bool = True,
    network: bool = False,
) -> SandboxedProcess:
    """Start ``python -m module IN_FD OUT_FD`` isolated, talking over two inherited pipes.

    Args:
        module: The worker's module (its ``main`` reads the spec from fd 3).
        limits: Resource limits.
        extra_env: Non-secret variables to add (e.g. ``CUDA_VISIBLE_DEVICES``).
        isolation: The isolation level; the worker never runs at a weaker one.
        reads: Directories a sandboxed worker may read beside its Python and code: its base
            model's. Inside the appliance's home (``hide``) they are made readable by the worker's
            own uid.
        files: Files it gets as open read-only descriptors (:attr:`SandboxedProcess.fds`), never
            by path: its dataset blobs (encrypted; 0600, which its own uid could not open).
        hide: What must stay out of a sandboxed worker's view even inside a bound directory
            (the appliance's home).
        gpu: Pass the host's GPU device nodes, if it has any, into the sandbox (a job trains on
            the GPU whenever the host has one); False for workers that must not touch it.
        network: Keep the host's network: a Ray rank's worker of a multi-rank job, which must reach
            its peer ranks for the gradient collective. The sandbox's other walls stay (its seccomp
            filter then admits IP and netlink sockets); ``network-only`` then amounts to ``none``.

    Raises:
        appliance.jobs.isolation.SandboxUnavailable: The level cannot be built here (fail closed).
    """
    level = IsolationLevel(isolation)
    limits = limits or WorkerLimits()
    # Each level's tools are checked before anything is made (fail closed, nothing left behind).
    program = seccomp_program(network) if level is IsolationLevel.SANDBOX else b""
    if level is IsolationLevel.SANDBOX:
        bwrap_path()
        for path in reads:
            grant_read(Path(path), [Path(h) for h in hide])
    prefix = network_prefix() if level is IsolationLevel.NETWORK_ONLY and not network else []
    uid = allocate_worker_uid() if level is IsolationLevel.SANDBOX and os.geteuid() == 0 else None
    tmpdir = Path(tempfile.mkdtemp(prefix=TMPDIR_PREFIX, dir=_tmp_root()))
    os.chmod(tmpdir, 0o700)
    (tmpdir / _OWNER_FILE).write_text(_process_identity(os.getpid()) or "")
    if uid is not None:
        os.chown(tmpdir, uid, uid)
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.update(OFFLINE_ENV)
    env.update({"HOME": str(tmpdir), "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(tmpdir / "cache"),
                "HF_HOME": str(tmpdir / "hf"), "TORCHINDUCTOR_CACHE_DIR": str(tmpdir / "inductor"),
                "USER": "worker", "LOGNAME": "worker"})
    env.update(extra_env or {})
    child_in_r, parent_out_w = os.pipe()
    parent_in_r, child_out_w = os.pipe()
    fds = [child_in_r, child_out_w]
    passed: dict[str, int] = {}
    try:
        for path in files:
            passed[str(path)] = os.open(path, os.O_RDONLY)
            fds.append(passed[str(path)])
        if level is IsolationLevel.SANDBOX:
            seccomp_fd = os.memfd_create("appliance-seccomp", 0)
            fds.append(seccomp_fd)
            os.write(seccomp_fd, program)
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            devices = gpu_devices() if gpu else []
            code = [Path(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).exists()]
            prefix = bwrap_argv(tmpdir=tmpdir, reads=[*code, *map(Path, reads)], hide=[Path(p) for p in hide],
                                seccomp_fd=seccomp_fd, devices=devices, uid=uid, network=network)
        argv = [*prefix, sys.executable, "-m", module, str(child_in_r), str(child_out_w)]

        def preexec() -> None:  # runs in the child between fork and exec
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
            if limits.max_memory_bytes:
                resource.setrlimit(resource.RLIMIT_DATA, (limits.max_memory_bytes, limits.max_memory_bytes))
            if limits.max_file_bytes:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
            os.nice(limits.nice)
            if uid is not None and limits.max_processes:  # enforced once setpriv has made it the worker's uid
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))

        proc = subprocess.Popen(
            argv, env=env, cwd=tmpdir, stdin=subprocess.DEVNULL, preexec_fn=preexec,  # noqa: PLW1509
            pass_fds=fds, start_new_session=True,
        )
    except BaseException:  # nothing of a worker that never started is left behind
        for fd in (*fds, parent_out_w, parent_in_r):
            os.close(fd)
        shutil.rmtree(tmpdir, ignore_errors=True)
        if uid is not None:
            release_worker_uid(uid)
        raise
    for fd in fds:
        os.close(fd)
    return SandboxedProcess(proc, parent_out_w, parent_in_r, tmpdir, isolation=level.value, argv=argv,
                            fds=passed, uid=uid, network="shared" if network or level is IsolationLevel.NONE
                            else "none")
