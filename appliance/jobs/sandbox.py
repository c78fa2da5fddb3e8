"""Launch a worker process isolated from the network and the host's secrets.

Each worker gets:

* its own network namespace (``unshare -n`` as root, ``unshare -rn`` through a
  user namespace otherwise) where the host allows it; the offline switches of
  every ML library in any case;
* a scrubbed environment (no ``APPLIANCE_*``, no proxies, no tokens);
* limits on open files and memory, and no core dumps (a core would be
  plaintext training data on disk);
* a private temporary directory on tmpfs, removed when it exits;
* two inherited pipes, the only channel for its input (spec and data keys)
  and output (events, checkpoints, artefacts): never argv, env or disk.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

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


def _probe(argv: list[str]) -> bool:
    try:
        return subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def network_isolation_prefix() -> list[str]:
    """The command prefix that puts a process in a fresh network namespace, or ``[]``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    for argv in ([unshare, "--net"], [unshare, "--net", "--map-root-user"]):
        if _probe(argv):
            return argv
    return []


@dataclass
class WorkerLimits:
    """Resource limits applied in the child before it runs."""

    max_open_files: int = 4096
    max_memory_bytes: int | None = None  # RLIMIT_DATA; None: unlimited
    nice: int = 5


@dataclass
class SandboxedProcess:
    """A running worker and the parent's ends of its pipes."""

    proc: subprocess.Popen
    to_child: int
    from_child: int
    tmpdir: Path
    isolated: bool
    argv: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for fd in (self.to_child, self.from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def spawn(
    module: str,
    *,
    limits: WorkerLimits | None = None,
    extra_env: dict[str, str] | None = None,
    isolate_network: bool = True,
) -> SandboxedProcess:
    """Start ``python -m module IN_FD OUT_FD`` isolated, talking over two inherited pipes.

    Args:
        module: The worker's module (its ``main`` reads the spec from fd 3).
        limits: Resource limits.
        extra_env: Non-secret variables to add (e.g. ``CUDA_VISIBLE_DEVICES``).
        isolate_network: Put the worker in its own network namespace when possible.
    """
    limits = limits or WorkerLimits()
    tmpdir = Path(tempfile.mkdtemp(prefix="appliance-job-", dir=_tmp_root()))
    os.chmod(tmpdir, 0o700)
    env = {k: os.environ[k] for k in _PASSTHROUGH if k in os.environ}
    env.update(OFFLINE_ENV)
    env.update({"HOME": str(tmpdir), "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(tmpdir / "cache"),
                "HF_HOME": str(tmpdir / "hf"), "TORCHINDUCTOR_CACHE_DIR": str(tmpdir / "inductor")})
    env.update(extra_env or {})
    child_in_r, parent_out_w = os.pipe()
    parent_in_r, child_out_w = os.pipe()
    prefix = network_isolation_prefix() if isolate_network else []
    argv = [*prefix, sys.executable, "-m", module, str(child_in_r), str(child_out_w)]

    def preexec() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        if limits.max_memory_bytes:
            resource.setrlimit(resource.RLIMIT_DATA, (limits.max_memory_bytes, limits.max_memory_bytes))
        os.nice(limits.nice)

    try:
        proc = subprocess.Popen(
            argv, env=env, cwd=tmpdir, stdin=subprocess.DEVNULL, preexec_fn=preexec,  # noqa: PLW1509
            pass_fds=(child_in_r, child_out_w), start_new_session=True,
        )
    except BaseException:
        for fd in (child_in_r, child_out_w, parent_out_w, parent_in_r):
            os.close(fd)
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    os.close(child_in_r)
    os.close(child_out_w)
    return SandboxedProcess(proc, parent_out_w, parent_in_r, tmpdir, isolated=bool(prefix), argv=argv)
