"""A hostile training worker, for the attack catalogue only (tests/security/test_worker_isolation.py).

Started exactly as a real worker is (:func:`appliance.jobs.sandbox.spawn`, ``python -m MODULE IN_FD
OUT_FD``). Two ways: the catalogue test (``HOSTILE_TARGETS=line``) gives it its targets as one JSON line on IN_FD; it tries
every attack in :data:`ATTACKS` and writes one JSON line back: for each attack, whether it got
through (``true``) and what happened. As a job's worker (the scheduler started with this module,
which only a test can choose) it reads the start frame, works out its targets from it, and ends the
job with the report. It lives under tests/: no API, job field or setting can select it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PTRACE_SEIZE = 0x4206
SYS_INIT_MODULE = 175  # x86_64
SYS_KEYCTL = 250
SYS_BPF = 321


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def tcp_appliance_port(t: dict[str, Any]) -> tuple[bool, str]:
    """Connect to the appliance's own port on 127.0.0.1 (a listener of the test, on the host)."""
    try:
        with socket.create_connection(("127.0.0.1", t["tcp_port"]), timeout=2) as s:
            s.sendall(b"hostile")
        return True, "connected"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def tcp_outside(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    """Open a TCP socket towards an outside address: a route out means it got through."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        return False, f"socket: {_errno_name(exc.errno or 0)}"
    with s:
        s.settimeout(1.5)
        try:
            s.connect(("10.255.255.1", 9))
            return True, "connected"
        except TimeoutError:
            return True, "no answer, but a route out (the packet left)"
        except OSError as exc:
            code = exc.errno or 0
            return code not in (errno.ENETUNREACH, errno.EHOSTUNREACH), _errno_name(code)


def udp_appliance_host(t: dict[str, Any]) -> tuple[bool, str]:
    """Send a UDP datagram to a listener of the test on the host's 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hostile", ("127.0.0.1", t["udp_port"]))
        return True, "sent (the test checks it arrived)"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def resolve_name(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    """Reach a DNS resolver: open a UDP socket to the host's first nameserver, port 53."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
        server = next(line.split()[1] for line in lines if line.startswith("nameserver"))
    except (OSError, StopIteration, IndexError):
        return False, "no resolver configuration in view"
    try:
        with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((server, 53))
            s.send(b"\x00")
        return True, f"sent a datagram to {server}:53"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def packet_socket(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    """Open a raw packet socket (sniff or forge the node's traffic; needs CAP_NET_RAW)."""
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)):
            return True, "opened"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def _read(path: str) -> tuple[bool, str]:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True, "read"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def read_key_file(t: dict[str, Any]) -> tuple[bool, str]:
    return _read(t["key_file"])


def read_database(t: dict[str, Any]) -> tuple[bool, str]:
    return _read(t["database"])


def read_other_job_tmp(t: dict[str, Any]) -> tuple[bool, str]:
    return _read(t["other_job_file"])


def read_other_blob(t: dict[str, Any]) -> tuple[bool, str]:
    """Another project's encrypted blob, in the storage root beside the worker's own."""
    return _read(t["other_blob"])


def write_outside_tmp(t: dict[str, Any]) -> tuple[bool, str]:
    """Write a file into the appliance's home (outside the worker's own directory)."""
    try:
        Path(t["write_target"]).write_bytes(b"hostile")
        return True, "written"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def list_server_processes(t: dict[str, Any]) -> tuple[bool, str]:
    seen = {p for p in os.listdir("/proc") if p.isdigit()}
    return str(t["server_pid"]) in seen, f"{len(seen)} processes in view"


def signal_server(t: dict[str, Any]) -> tuple[bool, str]:
    """Signal 0 (a probe that harms nothing) to the server's process."""
    try:
        os.kill(t["server_pid"], 0)
        return True, "the server's pid answers"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


def ptrace_parent(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    """PTRACE_SEIZE the parent (seizing does not stop it; the trace ends when this process exits)."""
    if _libc.ptrace(ctypes.c_long(PTRACE_SEIZE), ctypes.c_long(os.getppid()), None, None) == 0:
        return True, f"seized pid {os.getppid()}"
    return False, _errno_name(ctypes.get_errno())


def mount_tmpfs(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    target = Path.cwd() / "mnt"
    target.mkdir(exist_ok=True)
    if _libc.mount(b"none", str(target).encode(), b"tmpfs", ctypes.c_ulong(0), None) == 0:
        _libc.umount2(str(target).encode(), 0)
        return True, "mounted"
    return False, _errno_name(ctypes.get_errno())


def _refused(call: int, *args: int) -> tuple[bool, str]:
    """A privileged call got through unless the kernel or the filter said EPERM (the arguments are bogus)."""
    if _libc.syscall(ctypes.c_long(call), *(ctypes.c_long(a) for a in args)) >= 0:
        return True, "succeeded"
    code = ctypes.get_errno()
    return code not in (errno.EPERM, errno.EACCES, errno.ENOSYS), _errno_name(code)


def load_kernel_module(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    return _refused(SYS_INIT_MODULE, 0, 0, 0)


def keyctl(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    return _refused(SYS_KEYCTL, 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring


def bpf(t: dict[str, Any]) -> tuple[bool, str]:  # noqa: ARG001
    return _refused(SYS_BPF, 0, 0, 0)


def fork_bomb(t: dict[str, Any]) -> tuple[bool, str]:
    """Fork ``fork_attempts`` children (bounded, so a level that does not stop it harms no one)."""
    children = []
    try:
        for _ in range(t["fork_attempts"]):
            try:
                pid = os.fork()
            except OSError as exc:
                return False, f"{_errno_name(exc.errno or 0)} after {len(children)} children"
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            children.append(pid)
        return True, f"{len(children)} children"
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def fill_memory(t: dict[str, Any]) -> tuple[bool, str]:
    """Allocate ``memory_attempt_bytes`` in 64 MiB pieces."""
    pieces = []
    try:
        while len(pieces) * (64 << 20) < t["memory_attempt_bytes"]:
            pieces.append(bytearray(64 << 20))
        return True, f"{len(pieces) * 64} MiB allocated"
    except MemoryError:
        return False, f"MemoryError after {len(pieces) * 64} MiB"
    finally:
        pieces.clear()


ATTACKS: dict[str, Callable[[dict[str, Any]], tuple[bool, str]]] = {
    "tcp_appliance_port": tcp_appliance_port,
    "tcp_outside": tcp_outside,
    "udp_appliance_host": udp_appliance_host,
    "resolve_name": resolve_name,
    "read_key_file": read_key_file,
    "read_database": read_database,
    "read_other_job_tmp": read_other_job_tmp,
    "read_other_blob": read_other_blob,
    "write_outside_tmp": write_outside_tmp,
    "list_server_processes": list_server_processes,
    "signal_server": signal_server,
    "ptrace_parent": ptrace_parent,
    "mount_tmpfs": mount_tmpfs,
    "load_kernel_module": load_kernel_module,
    "keyctl": keyctl,
    "bpf": bpf,
    "packet_socket": packet_socket,
    "fork_bomb": fork_bomb,
    "fill_memory": fill_memory,
}


def run_catalogue(targets: dict[str, Any], attacks: dict[str, Callable] | None = None) -> dict[str, Any]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    report: dict[str, Any] = {"uid": os.getuid(), "pid": os.getpid(), "no_new_privs": status["NoNewPrivs"].strip(),
                              "effective_caps": status["CapEff"].strip()}
    for name, attack in (attacks or ATTACKS).items():
        try:
            through, detail = attack(targets)
        except Exception as exc:  # noqa: BLE001 - an attack that crashed did not get through
            through, detail = False, f"{type(exc).__name__}: {exc}"
        report[name] = {"through": through, "detail": detail}
    return report


def list_storage(t: dict[str, Any]) -> tuple[bool, str]:
    """List the storage root, where every project's encrypted blobs are."""
    try:
        return True, f"{len(os.listdir(t['storage']))} entries"
    except OSError as exc:
        return False, _errno_name(exc.errno or 0)


#: What a hostile *job* tries: it is told nothing but its start frame, and works the rest out as an
#: intruder would (the appliance's home is two levels above its base model's directory).
JOB_ATTACKS: dict[str, Callable[[dict[str, Any]], tuple[bool, str]]] = {
    "tcp_outside": tcp_outside, "resolve_name": resolve_name, "read_key_file": read_key_file,
    "read_database": read_database, "list_storage": list_storage, "write_outside_tmp": write_outside_tmp,
    "ptrace_parent": ptrace_parent, "mount_tmpfs": mount_tmpfs, "keyctl": keyctl, "bpf": bpf,
}


def serve_job(in_fd: int, out_fd: int) -> int:
    """Started by the scheduler as a job's worker (``SchedulerSettings(worker_module=...)``, tests only):
    run the catalogue from the start frame alone and end the job with the report as its error."""
    from appliance.jobs.channel import Channel, PipeTransport

    channel = Channel(PipeTransport(in_fd, out_fd))
    frame = channel.transport.read()
    if frame is None:
        return 2
    start = frame[0]
    home = Path(start["model_dir"]).parent.parent
    targets = {"key_file": str(home / "keys" / "master.key"), "database": str(home / "appliance.db"),
               "storage": str(home / "data" / "blobs"), "write_target": str(home / "written-by-a-job")}
    report = run_catalogue(targets, JOB_ATTACKS)
    through = sorted(name for name, outcome in report.items() if isinstance(outcome, dict) and outcome["through"])
    channel.event("hostile catalogue ran", type="hostile", data=report)
    channel.send({"type": "error", "code": "hostile_catalogue", "param": None,
                  "message": f"attempts that got through: {', '.join(through) or 'none'}"})
    return 1


def main(argv: list[str]) -> int:
    if os.environ.get("HOSTILE_TARGETS") == "line":  # the catalogue test: targets as one JSON line
        with os.fdopen(int(argv[1]), "r") as inp:
            targets = json.loads(inp.readline())
        with os.fdopen(int(argv[2]), "w") as out:
            out.write(json.dumps(run_catalogue(targets)) + "\n")
        return 0
    return serve_job(int(argv[1]), int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
