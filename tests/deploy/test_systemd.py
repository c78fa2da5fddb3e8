"""deploy/systemd: ``systemd-analyze verify``, an exposure ceiling, and what each unit promises."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.jobs.sandbox import network_isolation_prefix
from appliance.jobs.wire import FrameReader, write_frame
from tests.deploy.validators import (
    DEPLOY,
    ENGINE_MAX_LORA_RANK,
    MAX_CPU_LORAS,
    REPO,
    VLLM_VERSION,
    check_appliance_env,
    check_key_wrapper,
    check_vllm_start_env,
    cli_flags,
    missing_validator,
    run,
)

UNITS_DIR = DEPLOY / "systemd"
UNITS = sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".socket"))
#: Exposure ceilings (systemd-analyze security: 0 best, 10 worst); raise one only with a reason.
EXPOSURE = {"appliance.service": 2.5, "appliance-vllm.service": 2.0, "appliance-worker@.service": 1.5}
#: vLLM's API key: one file, loaded as this credential by both appliance.service and appliance-vllm.service.
KEY_CREDENTIAL = "vllm_api_key:/etc/appliance/vllm.token"


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it is given (keys repeat), continuation lines joined."""
    keys: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def environment(unit: dict[str, list[str]]) -> dict[str, str]:
    return dict(item.split("=", 1) for line in unit.get("Environment", []) for item in line.split())


def specifiers(value: str, unit_name: str) -> str:
    """``value`` with the specifiers the units use resolved as systemd would for ``unit_name``."""
    return value.replace("%d", f"/run/credentials/{unit_name}")


def instance(name: str) -> str:
    return name.replace("@.", "@0.")


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        missing_validator("systemd-analyze", "apt-get install systemd (`make test` does it as root)")
    return tool


def make_root(root: Path, units_dir: Path) -> Path:
    """A root with the host's system units, ours, and a stand-in for every program they start."""
    host_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    shutil.copytree(units_dir, root / "etc/systemd/system")
    for unit in units_dir.iterdir():
        for key, values in parse_unit(unit).items():
            if key.startswith("Exec"):
                for value in values:
                    program = root / value.lstrip("-+!@:").split()[0].lstrip("/")
                    program.parent.mkdir(parents=True, exist_ok=True)
                    program.write_text("#!/bin/sh\n")
                    program.chmod(0o755)
    return root


def verify(tool: str, root: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    return run([tool, "verify", f"--root={root}", *map(instance, names)])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, systemd_analyze: str) -> Path:
    return make_root(tmp_path_factory.mktemp("systemd-root"), UNITS_DIR)


def test_units_verify(systemd_analyze: str, root: Path) -> None:
    assert set(UNITS) == {"appliance.service", "appliance-vllm.service", "appliance-worker.socket",
                          "appliance-worker@.service"}
    proc = verify(systemd_analyze, root, UNITS)
    # systemd ignores unknown keys and bad values with a warning: any output is a failure.
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), proc.stderr


def test_verify_catches_a_misspelt_setting(systemd_analyze: str, tmp_path: Path) -> None:
    units = tmp_path / "units"
    shutil.copytree(UNITS_DIR, units)
    worker = units / "appliance-worker@.service"
    worker.write_text(worker.read_text().replace("PrivateNetwork=yes", "PrivateNetwrok=yes"))
    proc = verify(systemd_analyze, make_root(tmp_path / "root", units), ["appliance-worker@.service"])
    assert "PrivateNetwrok" in proc.stderr


@pytest.mark.parametrize("name", sorted(EXPOSURE))
def test_exposure(systemd_analyze: str, root: Path, name: str) -> None:
    proc = run([systemd_analyze, "security", "--offline=true", f"--root={root}", instance(name)])
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= EXPOSURE[name], proc.stdout


def _gpu_only_devices(unit: dict[str, list[str]]) -> None:
    assert unit["DevicePolicy"] == ["closed"]
    assert {d.split()[0] for d in unit["DeviceAllow"]} == {"char-nvidia-frontend", "char-nvidia-uvm"}


def _sandboxed(unit: dict[str, list[str]]) -> None:
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "LimitCORE": "0", "UMask": "0077",
                       "User": "appliance"}.items():
        assert unit.get(key) == [value], key


def test_appliance_unit() -> None:
    unit = parse_unit(UNITS_DIR / "appliance.service")
    _sandboxed(unit)
    _gpu_only_devices(unit)
    # The workers it starts make a user + network namespace (appliance/jobs/sandbox.py): only those.
    assert unit["RestrictNamespaces"] == ["user net"]
    assert unit["IPAddressDeny"] == ["any"]
    env = {k: specifiers(v, "appliance.service") for k, v in environment(unit).items()}
    check_appliance_env(env, "appliance.service")
    # vLLM's API key, from the credential appliance-vllm.service loads too.
    assert unit["LoadCredential"] == [KEY_CREDENTIAL]
    credential = KEY_CREDENTIAL.split(":")[0]
    assert env["APPLIANCE_VLLM_API_KEY_FILE"] == specifiers(f"%d/{credential}", "appliance.service")
    # The key file lives outside the home (backed up apart), in a state directory of its own.
    key_dir = Path(env["APPLIANCE_KEY_FILE"]).parent
    assert key_dir != Path(env["APPLIANCE_HOME"])
    assert {"/var/lib/" + d for d in unit["StateDirectory"][0].split()} == {env["APPLIANCE_HOME"], str(key_dir)}


def test_vllm_unit() -> None:
    unit = parse_unit(UNITS_DIR / "appliance-vllm.service")
    _sandboxed(unit)
    _gpu_only_devices(unit)
    env = environment(unit)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # `sh -c WRAPPER vllm serve ...`: the wrapper sets VLLM_API_KEY (test_vllm_unit_api_key).
    wrapper_argv = shlex.split(unit["ExecStart"][0])
    argv = wrapper_argv[3:]
    assert wrapper_argv[:2] == ["/bin/sh", "-c"] and argv[:2] == ["/opt/vllm/bin/vllm", "serve"]
    assert "--enable-lora" in argv
    flag = cli_flags(argv)
    assert int(flag["max-lora-rank"]) == ENGINE_MAX_LORA_RANK
    max_cpu_loras = env["VLLM_MAX_CPU_LORAS"]
    assert flag["max-cpu-loras"] == "${VLLM_MAX_CPU_LORAS}" and int(max_cpu_loras) <= MAX_CPU_LORAS
    # Equal to the appliance's default, which appliance.service does not change.
    from appliance.settings import ServingSettings

    assert "APPLIANCE_MAX_RESIDENT_ADAPTERS" not in environment(parse_unit(UNITS_DIR / "appliance.service"))
    assert int(max_cpu_loras) == ServingSettings().max_resident_adapters
    # Where the appliance's default APPLIANCE_VLLM_URL looks for it.
    assert f"http://{flag['host']}:{flag['port']}" == ServingSettings().vllm_url
    # Only the base models of the appliance's state, read-only; never the keys.
    assert unit["BindReadOnlyPaths"] == ["/var/lib/appliance/models"]
    assert unit["TemporaryFileSystem"] == ["/var/lib/appliance:ro"]
    assert unit["InaccessiblePaths"] == ["-/var/lib/appliance-keys"]


def test_vllm_unit_api_key(tmp_path: Path) -> None:
    unit = parse_unit(UNITS_DIR / "appliance-vllm.service")
    assert unit["LoadCredential"] == [KEY_CREDENTIAL]
    credential = KEY_CREDENTIAL.split(":")[0]
    # Never a literal key: not in the environment, not as --api-key.
    wrapper_argv = shlex.split(unit["ExecStart"][0])
    assert "VLLM_API_KEY" not in environment(unit) and "api-key" not in cli_flags(wrapper_argv[3:])
    # systemd turns $$ into $ and resolves %d; run the wrapper as sh will see it.
    check_key_wrapper(wrapper_argv[2].replace("$$", "$"), f"%d/{credential}", tmp_path, "appliance-vllm.service")


def test_vllm_unit_starts_with_writable_caches_and_the_pinned_release() -> None:
    unit = parse_unit(UNITS_DIR / "appliance-vllm.service")
    env = environment(unit)
    # The appliance's user (the adapter directories are 0700); the caches in its CacheDirectory=.
    assert env["USER"] == env["LOGNAME"] == unit["User"][0] == parse_unit(UNITS_DIR / "appliance.service")["User"][0]
    check_vllm_start_env(env, ["/var/cache/" + d for d in unit["CacheDirectory"][0].split()], "appliance-vllm.service")
    # The venv's install instructions name the tested release.
    assert f"/opt/vllm/bin/pip install vllm=={VLLM_VERSION}" in (UNITS_DIR / "appliance-vllm.service").read_text()


def test_worker_units() -> None:
    unit = parse_unit(UNITS_DIR / "appliance-worker@.service")
    _sandboxed(unit)
    _gpu_only_devices(unit)
    assert unit["PrivateNetwork"] == ["yes"] and unit["RestrictNamespaces"] == ["yes"]
    assert unit["InaccessiblePaths"] == ["-/var/lib/appliance-keys"]
    assert unit["ExecStart"] == ["/opt/appliance/bin/python -m appliance.jobs.worker 3 3"]
    # The same offline environment the sandbox gives a forked worker.
    from appliance.jobs.sandbox import OFFLINE_ENV

    assert OFFLINE_ENV.items() <= environment(unit).items()
    socket_unit = parse_unit(UNITS_DIR / "appliance-worker.socket")
    assert socket_unit["Accept"] == ["yes"] and socket_unit["SocketMode"] == ["0600"]
    assert socket_unit["SocketUser"] == ["appliance"]


def test_the_worker_speaks_over_one_socket_as_the_worker_unit_runs_it(tmp_path: Path) -> None:
    """``appliance.jobs.worker FD FD``: one connected socket carries both directions (systemd's fd 3)."""
    parent, child = socket.socketpair()
    fd = child.fileno()
    prefix = network_isolation_prefix()  # what PrivateNetwork=yes gives the unit
    stderr = tmp_path / "worker.err"
    with stderr.open("w") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "appliance.jobs.worker", str(fd), str(fd)],
                                pass_fds=(fd,), cwd=REPO, stdin=subprocess.DEVNULL, stderr=err)
    child.close()
    try:
        write_frame(parent.fileno(), {"type": "start", "job_id": "ftjob-unit", "project": "p",
                                      "method_type": "no-such-method", "hyperparameters": {}, "seed": 0,
                                      "model_dir": str(tmp_path), "model_kind": "causal_lm", "datasets": [],
                                      "resume_step": None})
        reader = FrameReader(parent.fileno())
        frames = []
        while not frames or frames[-1][0]["type"] == "event":
            frame = reader.read(timeout=120)
            assert frame is not None, f"no frame from the worker (exit {proc.poll()}): {stderr.read_text()[-3000:]}"
            frames.append(frame)
    finally:
        parent.close()
        proc.wait(timeout=60)
    isolation = frames[0][0]
    assert isolation["event_type"] == "isolation"
    if prefix:
        assert isolation["data"]["interfaces"] == ["lo"] and isolation["level"] == "info", isolation
    assert frames[-1][0]["type"] == "error" and "no-such-method" in frames[-1][0]["message"]
