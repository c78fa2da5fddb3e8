"""How far a local training worker is shut in: the isolation levels, bubblewrap and a seccomp filter.

``APPLIANCE_WORKER_ISOLATION`` picks one level for every local worker:

* ``sandbox`` (the default): the worker runs under Debian's ``bubblewrap`` (the sandbox Flatpak
  uses) in its own network, PID, IPC, UTS, cgroup and mount namespaces, with no capability and no
  new privileges, under a user of its own: when the server runs as root, a host uid of its own
  (:data:`WORKER_UID_BASE` onwards; ``setpriv`` drops to it once bubblewrap has built the sandbox),
  with a process limit that holds a fork bomb; otherwise uid 65534 in a user namespace. Its file system
  is built from nothing: read-only ``/usr`` (and the ``/lib``, ``/bin`` links), a few loader files
  from ``/etc``, the Python environment and the appliance's code, the job's own base-model
  directory, its dataset blobs as open descriptors (encrypted; the keys come over the pipe), its private temporary
  directory, a fresh ``/proc``, a minimal ``/dev`` and an empty ``/tmp``. The key file, the
  database, the rest of the storage root and other jobs' directories are not in its view; when
  one of them lies inside a bound directory it is covered by an empty tmpfs. A seccomp filter
  (libseccomp, through ``pyseccomp``) refuses ``socket()`` for every family but ``AF_UNIX``,
  ``ptrace``, ``mount``, ``bpf``, ``kexec``, module loading, ``keyctl`` and the other calls in
  :data:`BLOCKED_SYSCALLS`.
* ``network-only``: only a network namespace of its own (``unshare``), the scrubbed environment
  and the resource limits; it can see the host's files as the server's user.
* ``none``: the scrubbed environment and the resource limits only.

Fail closed: when the chosen level cannot be built, :func:`appliance.jobs.sandbox.spawn` raises
:class:`SandboxUnavailable` naming what is missing and how to install it, and the job fails with
that message; it never runs at a weaker level than the administrator chose.

Under a server that is not root, the worker is uid 65534 only inside its user namespace; outside
it, the kernel sees the server's user, so there the mount namespace, not the uid, is what keeps the
key file and the database out of reach (and no process limit is set: it would count the server's
own threads).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Sequence
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

#: When the server runs as root, each sandboxed worker also runs, outside its user namespace, as a
#: host uid of its own from this range (no passwd entry, no files but its directory): it cannot read
#: the server's 0600 files even through a path it should never see, and its process count limit
#: (RLIMIT_NPROC, which root is exempt from) holds a fork bomb to that worker alone.
WORKER_UID_BASE = 1_900_000_000
WORKER_UID_COUNT = 4096
_uids_lock = threading.Lock()
_uids_in_use: set[int] = set()


def allocate_worker_uid() -> int:
    """A host uid no other live worker of this process holds.

    The search starts at a random place, so that two control planes on one host rarely pick the same.
    """
    start = secrets.randbelow(WORKER_UID_COUNT)
    with _uids_lock:
        for i in range(WORKER_UID_COUNT):
            uid = WORKER_UID_BASE + (start + i) % WORKER_UID_COUNT
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise SandboxUnavailable(f"all {WORKER_UID_COUNT} worker uids are in use")


def release_worker_uid(uid: int) -> None:
    with _uids_lock:
        _uids_in_use.discard(uid)


def is_worker_uid(uid: int) -> bool:
    return WORKER_UID_BASE <= uid < WORKER_UID_BASE + WORKER_UID_COUNT


def grant_read(path: Path, owned_roots: Sequence[Path]) -> None:
    """Make ``path`` (a base model's directory) readable by a worker's own uid.

    Inside the appliance's home (``owned_roots``) the missing read bits for others are added: the
    home's own directories stay 0700, so no host user gains anything, and the sandbox binds the model
    directory itself. Elsewhere nothing is changed.

    Raises:
        SandboxUnavailable: ``path`` lies outside the home and a worker uid could not read it.
    """
    path = Path(path).resolve()
    ours = any(path == r or r in path.parents for r in (Path(x).resolve() for x in owned_roots))
    todo = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in todo:
        mode = item.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        want = (stat.S_IROTH | stat.S_IXOTH) if stat.S_ISDIR(mode) else stat.S_IROTH
        if mode & want == want:
            continue
        if not ours:
            raise SandboxUnavailable(f"{item} is not readable by the sandboxed worker's own user (mode "
                                     f"{stat.S_IMODE(mode):04o}): make the base model's files readable (o+r, "
                                     "and o+x on its directories) or import it into the appliance")
        os.chmod(item, stat.S_IMODE(mode) | want)


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
#: ... and, for a worker that keeps its node's network, the resolver's.
_RESOLVER_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/host.conf", "/etc/gai.conf")


#: Socket families a worker that keeps its node's network may open (a data-parallel rank reaching its
#: peers: TCP for gloo and NCCL, netlink for their interface lookup); every other family stays refused.
NETWORK_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)


def seccomp_program(network: bool = False) -> bytes:
    """The sandbox's seccomp filter as a BPF program (what ``bwrap --seccomp`` reads).

    Args:
        network: Admit the :data:`NETWORK_FAMILIES` sockets (a worker that keeps its node's network);
            otherwise ``AF_UNIX`` only.

    Raises:
        SandboxUnavailable: libseccomp or its Python binding is missing.
    """
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # OSError: the binding is there, libseccomp.so.2 is not
        raise SandboxUnavailable(f"the seccomp filter cannot be built ({type(exc).__name__}: {exc}): "
                                 f"{_INSTALL_SECCOMP}") from exc
    return _program(sc, network)


@cache
def _program(sc, network: bool = False) -> bytes:  # noqa: ANN001 - the pyseccomp module
    filt = sc.SyscallFilter(sc.ALLOW)
    refuse_family = sc.ERRNO(errno.EAFNOSUPPORT)
    allowed = NETWORK_FAMILIES if network else (socket.AF_UNIX,)
    for call in ("socket", "socketpair"):
        # One comparison per rule (libseccomp's rules are or-ed): above the highest allowed family, and
        # each family below it that is not allowed.
        filt.add_rule(refuse_family, call, sc.Arg(0, sc.GT, max(allowed)))
        for family in range(max(allowed)):
            if family not in allowed:
                filt.add_rule(refuse_family, call, sc.Arg(0, sc.EQ, family))
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
    argv = [bwrap, *_namespaces(None if os.geteuid() else WORKER_UID_BASE), *_system_binds(),
            "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["exit status "
                                                                                  f"{done.returncode}"])[-1]


def _namespaces(uid: int | None, network: bool = False) -> list[str]:
    """bwrap's namespace options: as root (``uid``: the worker's own host uid, dropped to by setpriv
    once the sandbox is built) every namespace but the user one, which root does not need and which
    would map the worker back to root; otherwise all of them, as uid 65534 in a user namespace.
    ``network``: keep the host's network namespace (and its host name, which gloo resolves)."""
    common = ["--die-with-parent", "--new-session", *([] if network else ["--hostname", "worker"])]
    if uid is not None:
        return [*([] if network else ["--unshare-net"]), "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", *common]
    return ["--unshare-all", *(["--share-net"] if network else []), "--cap-drop", "ALL",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), *common]


def _setpriv(uid: int) -> list[str]:
    """The command that turns the sandbox's root into the worker's own uid, with no capabilities left."""
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setpriv is None:
        raise SandboxUnavailable("util-linux's setpriv is missing: apt-get install util-linux")
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


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


def _system_binds(network: bool = False) -> list[str]:
    """/usr read-only, /bin, /lib, /lib64, /sbin as the host has them (links on merged-/usr hosts);
    with ``network``, the resolver's files too."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        path = Path(top)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), top]
        elif path.is_dir():
            args += ["--ro-bind", top, top]
    for etc in (*_ETC_FILES, *(_RESOLVER_FILES if network else ())):
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
               devices: list[str] | None = None, uid: int | None = None, network: bool = False) -> list[str]:
    """The ``bwrap ...`` prefix for one worker.

    Args:
        tmpdir: The worker's private directory (its HOME and TMPDIR), bound read-write.
        reads: Files and directories it may read (its base model, its dataset blobs).
        hide: Paths that must stay out of its view even when inside a bound directory (the
            appliance's home: key file, database, storage root). Each is covered by an empty tmpfs.
        seccomp_fd: An inherited descriptor holding :func:`seccomp_program`'s bytes.
        devices: Device nodes to pass through (GPU nodes for a job that uses a GPU).
        uid: The worker's own host uid (a server running as root), else None: uid 65534 in a user
            namespace, the server's user outside it.
        network: Keep the host's network namespace (a Ray rank's worker reaching its peer ranks);
            pair it with ``seccomp_program(network=True)``.
    """
    argv = [bwrap_path(), *_namespaces(uid, network), *_system_binds(network), "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--tmpfs", "/tmp"]
    roots = _python_roots()
    # The directories above each bind are made by bwrap; as root it makes them 0700, which the
    # worker's own uid could not pass through: 0755, each once, top down.
    made: set[Path] = {Path("/"), Path("/usr"), Path("/proc"), Path("/dev"), Path("/tmp")}
    for dest in sorted({p.resolve() for p in [*roots, *reads, tmpdir]}, key=lambda p: len(p.parts)):
        for parent in reversed(dest.parents):
            if parent not in made:
                argv += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
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
    if devices:  # CUDA and NCCL read the devices' topology from /sys (read-only)
        argv += ["--ro-bind-try", "/sys", "/sys"]
    argv += ["--bind", str(tmpdir), str(tmpdir), "--chdir", str(tmpdir), "--seccomp", str(seccomp_fd)]
    return argv + (_setpriv(uid) if uid is not None else [])


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
