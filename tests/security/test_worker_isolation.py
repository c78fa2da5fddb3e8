"""The attack catalogue: a hostile worker, started exactly as a real one, tries to break out.

At the default level (``sandbox``: bubblewrap, seccomp) every attempt fails and nothing outside the
worker changes. The same catalogue at the weaker levels an administrator may choose
(``APPLIANCE_WORKER_ISOLATION=network-only``, ``none``) shows exactly which attempts those levels no
longer stop, so the trade-off is stated by a test, not by prose. A level that cannot be built fails
closed with a message naming what is missing.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance.jobs import isolation
from appliance.jobs.isolation import IsolationLevel, SandboxUnavailable
from appliance.jobs.sandbox import WorkerLimits, spawn

pytestmark = [pytest.mark.no_database]

HOSTILE = "tests.security.hostile_worker"
REPO = Path(__file__).resolve().parents[2]
NETWORK = {"tcp_appliance_port", "tcp_outside", "udp_appliance_host", "resolve_name"}
FILES = {"read_key_file", "read_database", "read_other_job_tmp", "read_other_blob", "write_outside_tmp"}
PROCESSES = {"list_server_processes", "signal_server", "ptrace_parent"}
PRIVILEGED = {"mount_tmpfs", "load_kernel_module", "keyctl", "bpf", "packet_socket"}
#: The catalogue's limits: a fork bomb of 300 against 64 processes, 2 GiB against 512 MiB.
LIMITS = WorkerLimits(max_memory_bytes=512 << 20, max_processes=64)
#: Attempts whose outcome at the weakest level depends on the host's routes, not on us.
HOST_ROUTES = {"tcp_outside", "resolve_name"}


class _Scene:
    """An appliance home with secrets, another job's directory and listeners on the host's loopback."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        (self.home / "keys").mkdir(parents=True)
        self.key_file = self.home / "keys" / "master.key"
        self.key_file.write_bytes(b"planted-master-key")
        self.key_file.chmod(0o600)
        self.database = self.home / "appliance.db"
        self.database.write_bytes(b"SQLite format 3\x00planted")
        blobs = self.home / "data" / "blobs"
        (blobs / "aa").mkdir(parents=True)
        self.own_blob, self.other_blob = blobs / "aa" / "own", blobs / "aa" / "other"
        self.own_blob.write_bytes(b"ciphertext of this job's dataset")
        self.other_blob.write_bytes(b"ciphertext of another project's dataset")
        self.other_job = Path(tempfile.mkdtemp(prefix="appliance-job-other-", dir="/dev/shm"))
        (self.other_job / "scratch").write_bytes(b"another job's plaintext scratch")
        self.write_target = self.home / "written-by-worker"
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(4)
        self.tcp.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)

    def targets(self) -> dict:
        return {"tcp_port": self.tcp.getsockname()[1], "udp_port": self.udp.getsockname()[1],
                "key_file": str(self.key_file), "database": str(self.database),
                "other_job_file": str(self.other_job / "scratch"), "other_blob": str(self.other_blob),
                "write_target": str(self.write_target), "server_pid": os.getpid(),
                "fork_attempts": 300, "memory_attempt_bytes": 2 << 30}

    def what_reached_the_host(self) -> set[str]:
        reached = set()
        try:
            conn, _ = self.tcp.accept()
            conn.close()
            reached.add("tcp_appliance_port")
        except BlockingIOError:
            pass
        try:
            self.udp.recvfrom(64)
            reached.add("udp_appliance_host")
        except BlockingIOError:
            pass
        return reached

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()
        shutil.rmtree(self.other_job, ignore_errors=True)


@pytest.fixture
def scene(tmp_path):
    s = _Scene(tmp_path)
    yield s
    s.close()


def _attack(scene: _Scene, level: IsolationLevel, network: bool = False) -> dict:
    worker = spawn(HOSTILE, isolation=level, files=[scene.own_blob], hide=[scene.home], gpu=False,
                   extra_env={"PYTHONPATH": str(REPO), "HOSTILE_TARGETS": "line"}, limits=LIMITS, network=network)
    uid = worker.uid  # released by cleanup
    try:
        os.write(worker.to_child, (json.dumps(scene.targets()) + "\n").encode())
        ready, _, _ = select.select([worker.from_child], [], [], 120)
        assert ready, "the hostile worker never reported"
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(worker.from_child, 65536)
            assert chunk, f"the hostile worker ended without a report (exit {worker.proc.wait(30)})"
            data += chunk
        assert worker.proc.wait(60) == 0
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()
        worker.cleanup()
    report = json.loads(data)
    report["worker_uid"] = uid
    # Judged on the host, not by the worker: a datagram sent in a network namespace of its own, or a
    # file written into the sandbox's private /tmp, reaches nothing of the host's.
    reached = scene.what_reached_the_host()
    for name in ("tcp_appliance_port", "udp_appliance_host"):
        report[name]["through"] = name in reached
    report["write_outside_tmp"]["through"] = scene.write_target.exists()
    return report


def _through(report: dict) -> set[str]:
    return {name for name, outcome in report.items() if isinstance(outcome, dict) and outcome["through"]}


def _privileged_here(report: dict) -> set[str]:
    """The privileged calls this kernel has at all (one built without modules answers ENOSYS to everyone)."""
    return {name for name in PRIVILEGED if report[name]["detail"] != "ENOSYS"}


def test_the_sandbox_stops_every_attack_and_nothing_outside_changes(scene):
    report = _attack(scene, IsolationLevel.SANDBOX)
    assert _through(report) == set(), json.dumps(report, indent=1)
    assert report["no_new_privs"] == "1" and int(report["effective_caps"], 16) == 0  # no way back up
    if os.geteuid() == 0:  # a host uid of its own, not root's, and not any other worker's
        assert isolation.is_worker_uid(report["uid"]) and report["uid"] == report["worker_uid"]
    else:  # nobody in its user namespace
        assert report["uid"] == isolation.SANDBOX_UID
    assert not scene.write_target.exists()
    assert (scene.other_job / "scratch").read_bytes() == b"another job's plaintext scratch"
    assert scene.key_file.read_bytes() == b"planted-master-key"
    # How each was stopped: seccomp answers socket() with EAFNOSUPPORT and the privileged calls with
    # EPERM; the secrets are simply not in the worker's view.
    assert report["tcp_outside"]["detail"] == "socket: EAFNOSUPPORT"
    assert report["read_key_file"]["detail"] == "ENOENT"
    assert report["read_other_blob"]["detail"] == "ENOENT"
    assert report["ptrace_parent"]["detail"] == "EPERM"
    assert report["load_kernel_module"]["detail"] == "EPERM"
    assert report["fork_bomb"]["detail"].startswith("EAGAIN"), report["fork_bomb"]
    assert report["fill_memory"]["detail"].startswith("MemoryError"), report["fill_memory"]
    assert subprocess.run(["true"]).returncode == 0  # the host still forks


def test_a_ray_ranks_sandbox_keeps_the_network_for_its_peers_and_every_other_wall(scene):
    """A Ray rank's worker in a multi-rank job keeps its node's network (the gradient collective needs
    TCP to the peer ranks): the network attempts go through, and nothing else does."""
    report = _attack(scene, IsolationLevel.SANDBOX, network=True)
    assert _through(report) - HOST_ROUTES == {"tcp_appliance_port", "udp_appliance_host"}, json.dumps(report, indent=1)
    assert report["no_new_privs"] == "1" and int(report["effective_caps"], 16) == 0
    assert report["read_key_file"]["detail"] == "ENOENT" and report["read_other_blob"]["detail"] == "ENOENT"
    assert report["ptrace_parent"]["detail"] == "EPERM" and report["load_kernel_module"]["detail"] == "EPERM"
    assert report["fork_bomb"]["detail"].startswith("EAGAIN"), report["fork_bomb"]
    assert not scene.write_target.exists()
    # Its seccomp filter admits IP and netlink sockets only: a raw packet socket is still refused.
    assert report["packet_socket"]["detail"] == "EAFNOSUPPORT", report["packet_socket"]


def test_the_sandbox_lets_the_worker_read_what_its_job_needs_and_write_its_own_directory(scene, tmp_path):
    """A sandbox that stops the training itself is no sandbox: the job's blob (an open descriptor), its
    base model (a read-only bind, made readable for the worker's uid inside the home), its Python
    and torch, and its own directory all work."""
    code = tmp_path / "code"
    code.mkdir(mode=0o755)
    (code / "probe.py").write_text(
        "import json, os, sys\n"
        "t = json.loads(os.fdopen(int(sys.argv[1])).readline())\n"
        "own = os.fdopen(t['blob_fd'], 'rb').read()\n"
        "config = open(os.path.join(t['model_dir'], 'config.json')).read()\n"
        "open('scratch', 'wb').write(b'x' * 1024)\n"
        "import torch, transformers, peft, appliance.jobs.worker\n"
        "os.fdopen(int(sys.argv[2]), 'w').write(json.dumps({'own': own.decode(), 'cwd': os.getcwd(),\n"
        "    'config': config, 'torch': torch.__version__}) + '\\n')\n")
    (code / "probe.py").chmod(0o644)
    model_dir = scene.home / "models" / "tiny"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "config.json").chmod(0o600)  # as under a 0077 umask: the sandbox must make it readable
    worker = spawn("probe", isolation=IsolationLevel.SANDBOX, reads=[model_dir], files=[scene.own_blob],
                   hide=[scene.home], gpu=False, extra_env={"PYTHONPATH": str(code)})
    try:
        message = {"blob_fd": worker.fds[str(scene.own_blob)], "model_dir": str(model_dir)}
        os.write(worker.to_child, (json.dumps(message) + "\n").encode())
        with os.fdopen(os.dup(worker.from_child)) as out:
            line = out.readline()
        assert worker.proc.wait(120) == 0, line
        result = json.loads(line)
        assert result["own"] == "ciphertext of this job's dataset"
        assert result["config"] == '{"model_type": "llama"}'
        assert result["cwd"] == str(worker.tmpdir)
        assert (worker.tmpdir / "scratch").stat().st_size == 1024
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.cleanup()
    assert stat.S_IMODE(scene.key_file.stat().st_mode) == 0o600  # only the model's files were opened up


@pytest.mark.skipif(os.geteuid() != 0, reason="the weaker levels' reach is stated for a server running as root, "
                    "as make test and the appliance's images run it")
def test_network_only_stops_the_network_attacks_and_nothing_else(scene):
    report = _attack(scene, IsolationLevel.NETWORK_ONLY)
    # The fork bomb gets through (root is exempt from RLIMIT_NPROC); memory stays limited at every level.
    assert _through(report) == FILES | PROCESSES | _privileged_here(report) | {"fork_bomb"}, \
        json.dumps(report, indent=1)
    assert scene.write_target.read_bytes() == b"hostile"


@pytest.mark.skipif(os.geteuid() != 0, reason="the weaker levels' reach is stated for a server running as root, "
                    "as make test and the appliance's images run it")
def test_no_isolation_stops_nothing(scene):
    report = _attack(scene, IsolationLevel.NONE)
    assert _through(report) - HOST_ROUTES == ((NETWORK - HOST_ROUTES) | FILES | PROCESSES | _privileged_here(report)
                                              | {"fork_bomb"}), \
        json.dumps(report, indent=1)


def test_a_sandbox_that_cannot_be_built_fails_closed_and_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap, no unshare
    isolation.network_isolation_prefix.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap"):
            spawn(HOSTILE, isolation=IsolationLevel.SANDBOX)
        with pytest.raises(SandboxUnavailable, match=r"APPLIANCE_WORKER_ISOLATION=none"):
            spawn(HOSTILE, isolation=IsolationLevel.NETWORK_ONLY)
        assert isolation.check(IsolationLevel.SANDBOX) is not None
        assert isolation.check(IsolationLevel.NONE) is None
    finally:
        isolation.network_isolation_prefix.cache_clear()


def test_a_failed_build_leaves_no_worker_directory(monkeypatch, tmp_path):
    before = set(Path("/dev/shm").glob("appliance-job-*"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable):
        spawn(HOSTILE, isolation=IsolationLevel.SANDBOX)
    assert set(Path("/dev/shm").glob("appliance-job-*")) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node takes root, as make test runs")
def test_gpu_device_nodes_reach_a_worker_only_when_it_uses_the_gpu(monkeypatch, tmp_path):
    """A GPU host's device nodes (and /sys, read-only, for CUDA's topology) are bound into the sandbox of a
    worker that trains on the GPU, and absent from one that must not touch it. This host has no GPU: a
    stand-in node in /dev with /dev/null's numbers, found the way ``gpu_devices`` finds /dev/nvidia*,
    takes its place (opened read-write inside, as the CUDA driver opens its nodes)."""
    node = Path(f"/dev/appliance-test-gpu{os.getpid()}")
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    node.chmod(0o666)
    monkeypatch.setattr("appliance.jobs.sandbox.gpu_devices", lambda: [str(node)])
    code = tmp_path / "code"
    code.mkdir(mode=0o755)
    (code / "gpuprobe.py").write_text(
        "import json, os, sys\n"
        "node = os.environ['PROBE_NODE']\n"
        "seen = {'node': os.path.exists(node), 'sys': os.path.isdir('/sys/class'), 'uid': os.getuid()}\n"
        "if seen['node']:\n"
        "    fd = os.open(node, os.O_RDWR)\n"
        "    seen['wrote'] = os.write(fd, b'kernel launch')\n"
        "    seen['read'] = os.read(fd, 16).decode()\n"
        "    os.close(fd)\n"
        "os.fdopen(int(sys.argv[2]), 'w').write(json.dumps(seen) + '\\n')\n")
    (code / "gpuprobe.py").chmod(0o644)

    def probe(gpu: bool) -> dict:
        worker = spawn("gpuprobe", isolation=IsolationLevel.SANDBOX, gpu=gpu,
                       extra_env={"PYTHONPATH": str(code), "PROBE_NODE": str(node)})
        try:
            with os.fdopen(os.dup(worker.from_child)) as out:
                line = out.readline()
            assert worker.proc.wait(60) == 0, line
            return json.loads(line)
        finally:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.cleanup()

    try:
        on_gpu, off_gpu = probe(gpu=True), probe(gpu=False)
    finally:
        node.unlink()
    assert on_gpu == {"node": True, "sys": True, "uid": on_gpu["uid"], "wrote": 13, "read": ""}, on_gpu
    assert on_gpu["uid"] != 0  # the node is opened by the worker's own user, not the server's
    assert off_gpu == {"node": False, "sys": False, "uid": off_gpu["uid"]}, off_gpu
