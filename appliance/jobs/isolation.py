"""How far a local training worker is shut in: the isolation levels, bubblewrap and a seccomp filter.

``APPLIANCE_WORKER_ISOLATION`` picks one level for every local worker:

* ``sandbox`` (the default): the worker runs under Debian's ``bubblewrap`` (the sandbox Flatpak
  uses) in its own user, network, PID, IPC, UTS, cgroup and mount namespaces, as uid/gid 65534
  inside its user namespace, with every capability dropped and no new privileges. Its file system
  is built from nothing: read-only ``/usr`` (and the ``/lib``, ``/bin`` links), a few loader files
  from ``/etc``, the Python environment and the appliance's code, the job's own base-model
  directory and dataset blobs (encrypted; the keys come over the pipe), its private temporary
  directory, a fresh ``/proc``, a minimal ``/dev`` and an empty ``/tmp``. The key file, the
  database, the rest of the storage root and other jobs' directories are not in its view; when
  one of them lies inside a bound directory it is covered by an empty tmpfs. A seccomp filter
  (libseccomp, through ``pyseccomp``) refuses ``socket()`` for every family but ``AF_UNIX``,
  ``ptrace``, ``mount``, ``bpf``, ``kexec``, module loading, ``keyctl`` and the other calls in
  :data:`BLOCKED_SYSCALLS`.
* ``network-only``: only a network namespace of its own (``unshare``), the scrubbed environment
  and the resource limits; it can see the host's files as the server's user.
* ``none``: the scrubbed environment and the resource limits only.

Fail closed: when the chosen level cannot be built, :func:`prefix` raises
:class:`SandboxUnavailable` naming what is missing and how to install it, and the job fails with
that message; it never runs at a weaker level than the administrator chose.

What the user namespace means: inside it the worker is uid 65534 with no capabilities; outside
it, the kernel sees the user that started bubblewrap (the server's). The mount namespace, not the
uid, is what keeps the key file and the database out of reach.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from enum import Enum
from functools import cache
from pathlib import Path


class IsolationLevel(str, Enum):
    """``APPLIANCE_WORKER_ISOLATION``'s values, strongest first."""

    SANDBOX = "sandbox"
    NETWORK_ONLY = "network-only"
    NONE = "none"


class SandboxUnavailable(RuntimeError):
    """The chosen isolation level cannot be built on this host; the message says what is missing."""


#: uid and gid the worker has inside its user namespace (``nobody``).
SANDBOX_UID = 65534

#: System calls the sandbox's seccomp filter refuses with EPERM, whatever their arguments.
BLOCKED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev",          # other processes' memory
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "unshare", "setns",                                          # new namespaces (a way to regain caps)
    "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "reboot",
    "init_module", "finit_module", "delete_module",
    "keyctl", "add_key", "request_key",
    "io_uring_setup",                                            # io_uring can open sockets around socket()
    "swapon", "swapoff", "acct", "quotactl",
    "open_by_handle_at",                                         # reaches files outside the mount view
)

_INSTALL = "install Debian's bubblewrap (apt-get install bubblewrap)"
_INSTALL_SECCOMP = ("install libseccomp (apt-get install libseccomp2) and the pyseccomp package "
                    "(pip install pyseccomp, part of the appliance's dependencies)")

#: Loader and name-service files a Python process reads from /etc; nothing else of /etc is shown.
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
              "/etc/nsswitch.conf", "/etc/alternatives")


def seccomp_program() -> bytes:
    """The sandbox's seccomp filter as a BPF program (what ``bwrap --seccomp`` reads).

    Raises:
        SandboxUnavailable: libseccomp or its Python binding is missing.
    """
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # OSError: the binding is there, libseccomp.so.2 is not
        raise SandboxUnavailable(f"the seccomp filter cannot be built ({type(exc).__name__}: {exc}): "
                                 f"{_INSTALL_SECCOMP}") from exc
    return _program(sc)


@cache
def _program(sc) -> bytes:  # noqa: ANN001 - the pyseccomp module
    filt = sc.SyscallFilter(sc.ALLOW)
    refuse_family = sc.ERRNO(errno.EAFNOSUPPORT)
    for call in ("socket", "socketpair"):
        filt.add_rule(refuse_family, call, sc.Arg(0, sc.NE, socket.AF_UNIX))
    for call in BLOCKED_SYSCALLS:
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), call)
        except (ValueError, OSError, RuntimeError):  # a call this kernel's headers do not know
            continue
    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "wb") as out:
            filt.export_bpf(out)
        with os.fdopen(read_fd, "rb") as inp:
            return inp.read()
    except BaseException:
        for fd in (read_fd, write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def bwrap_path() -> str:
    """The ``bwrap`` binary that works here.

    Raises:
        SandboxUnavailable: it is missing, or it cannot make namespaces on this host.
    """
    found = shutil.which("bwrap")
    if found is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {_INSTALL}, or choose a weaker level "
                                 "with APPLIANCE_WORKER_ISOLATION=network-only")
    problem = _bwrap_problem(found)
    if problem:
        raise SandboxUnavailable(f"bubblewrap cannot build a sandbox on this host: {problem}. Allow user "
                                 "namespaces (sysctl user.max_user_namespaces > 0; in a container, a seccomp "
                                 "profile that permits clone with CLONE_NEWUSER) or choose a weaker level with "
                                 "APPLIANCE_WORKER_ISOLATION=network-only")
    return found


@cache
def _bwrap_problem(bwrap: str) -> str:
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID), *_system_binds(), "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["exit status "
                                                                                  f"{done.returncode}"])[-1]


def network_prefix() -> list[str]:
    """The command prefix that puts a process in a fresh network namespace.

    Raises:
        SandboxUnavailable: neither ``unshare --net`` nor ``unshare --net --map-root-user`` works here.
    """
    found = network_isolation_prefix()
    if not found:
        raise SandboxUnavailable("no network namespace can be made here (util-linux's unshare is missing or "
                                 "namespaces are not allowed): install util-linux, or choose "
                                 "APPLIANCE_WORKER_ISOLATION=none")
    return found


@cache
def network_isolation_prefix() -> list[str]:
    """The command prefix that puts a process in a fresh network namespace, or ``[]``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    for argv in ([unshare, "--net"], [unshare, "--net", "--map-root-user"]):
        try:
            if subprocess.run([*argv, "true"], capture_output=True, timeout=10).returncode == 0:
                return argv
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def _system_binds() -> list[str]:
    """/usr read-only, /bin, /lib, /lib64, /sbin as the host has them (links on merged-/usr hosts)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        path = Path(top)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            args += ["--ro-bind", top, top]
    for etc in _ETC_FILES:
        args += ["--ro-bind-try", etc, etc]
    return args


def _python_roots() -> list[Path]:
    """Directories the worker's Python needs: the environment and the appliance's code."""
    import appliance
    import serving

    roots = {Path(sys.prefix), Path(sys.exec_prefix), Path(sys.base_prefix),
             Path(os.path.realpath(sys.executable)).parent,
             Path(appliance.__file__).resolve().parent.parent, Path(serving.__file__).resolve().parent.parent}
    roots |= {Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    roots |= {Path(p) for p in sys.path if p and Path(p).is_dir() and not p.endswith(".zip")}
    return _outermost(r.resolve() for r in roots if r.exists())


def _outermost(paths) -> list[Path]:  # noqa: ANN001 - an iterable of paths
    kept: list[Path] = []
    for path in sorted(set(paths), key=lambda p: len(p.parts)):
        if path == Path("/") or any(path == k or k in path.parents for k in kept):
            continue
        if path == Path("/usr") or Path("/usr") in path.parents:
            continue  # already bound
        kept.append(path)
    return kept


def bwrap_argv(*, tmpdir: Path, reads: list[Path], hide: list[Path], seccomp_fd: int,
               devices: list[str] | None = None) -> list[str]:
    """The ``bwrap ...`` prefix for one worker.

    Args:
        tmpdir: The worker's private directory (its HOME and TMPDIR), bound read-write.
        reads: Files and directories it may read (its base model, its dataset blobs).
        hide: Paths that must stay out of its view even when inside a bound directory (the
            appliance's home: key file, database, storage root). Each is covered by an empty tmpfs.
        seccomp_fd: An inherited descriptor holding :func:`seccomp_program`'s bytes.
        devices: Device nodes to pass through (GPU nodes for a job that uses a GPU).
    """
    argv = [bwrap_path(), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "worker",
            *_system_binds(), "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    roots = _python_roots()
    for root in roots:
        argv += ["--ro-bind", str(root), str(root)]
    for path in hide:
        path = Path(path).resolve()
        if any(path == r or r in path.parents for r in roots):
            argv += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
    for path in reads:
        path = Path(path).resolve()
        argv += ["--ro-bind", str(path), str(path)]
    for node in devices or []:
        argv += ["--dev-bind-try", node, node]
    argv += ["--bind", str(tmpdir), str(tmpdir), "--chdir", str(tmpdir), "--seccomp", str(seccomp_fd)]
    return argv


def gpu_devices() -> list[str]:
    """The NVIDIA device nodes of this host (``/dev/nvidia*``, ``/dev/nvidia-caps``)."""
    return sorted(str(p) for p in Path("/dev").glob("nvidia*"))


def check(level: IsolationLevel) -> str | None:
    """Why ``level`` cannot be built on this host, or None when it can (for start-up checks)."""
    try:
        if level is IsolationLevel.SANDBOX:
            bwrap_path()
            seccomp_program()
        elif level is IsolationLevel.NETWORK_ONLY:
            network_prefix()
    except SandboxUnavailable as exc:
        return str(exc)
    return None
