"""deploy/compose/compose.yaml, rendered by ``docker compose config`` (or Debian's docker-compose)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.validators import (
    DEPLOY,
    ENGINE_MAX_LORA_RANK,
    MAX_CPU_LORAS,
    VLLM_IMAGE,
    check_appliance_env,
    check_key_wrapper,
    check_vllm_start_env,
    cli_flags,
    missing_validator,
    run,
)

COMPOSE_DIR = DEPLOY / "compose"


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    missing_validator("docker compose (or docker-compose)",
                      "apt-get install docker-compose (`make test` does it as root)")


def compose_config(compose_file: Path, env_file: Path = COMPOSE_DIR / "env.example") -> tuple[int, str, str]:
    # A bare environment: only the env file may feed the interpolation.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(compose_file.parent)}
    proc = run([*compose_cli(), "--env-file", str(env_file), "-f", str(compose_file), "config"],
               env=env, cwd=compose_file.parent)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def rendered() -> dict[str, Any]:
    code, out, err = compose_config(COMPOSE_DIR / "compose.yaml")
    assert code == 0, f"compose config failed:\n{err}"
    return yaml.safe_load(out)


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from either Compose's short or long volume syntax."""
    mounts = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            mounts[target] = (source, bool(mode) and "ro" in mode[0].split(","))
        else:
            mounts[v["target"]] = (v["source"], bool(v.get("read_only")))
    return mounts


def _secrets(service: dict[str, Any]) -> dict[str, str]:
    """Path in the container -> secret name, from either syntax (Compose mounts them under /run/secrets)."""
    targets = {}
    for secret in service.get("secrets", []):
        source = secret if isinstance(secret, str) else secret["source"]
        target = source if isinstance(secret, str) else secret.get("target", source)
        targets[target if target.startswith("/") else f"/run/secrets/{target}"] = source
    return targets


def _unescape(value: str) -> str:
    """A rendered value as the container gets it: Compose writes a literal ``$`` as ``$$``."""
    return value.replace("$$", "$")


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text((COMPOSE_DIR / "compose.yaml").read_text().replace("    cap_drop: [ALL]", "    cap_drop: ALL", 1))
    code, out, err = compose_config(broken)
    assert code != 0 and "cap_drop" in out + err, "a cap_drop that is not a list should not validate"


def test_services(rendered: dict[str, Any]) -> None:
    assert set(rendered["services"]) == {"appliance", "vllm", "postgres"}


def test_the_appliance_settings_are_real_and_point_at_vllm_and_postgres(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    env = services["appliance"]["environment"]
    check_appliance_env(env, "compose.yaml")
    assert env["APPLIANCE_SERVING_ENGINE"] == "vllm"
    url = urlsplit(env["APPLIANCE_VLLM_URL"])
    assert url.hostname == "vllm" and url.port == int(cli_flags(services["vllm"]["command"])["port"])
    # PostgreSQL over the socket in the shared volume.
    socket_dir = env["APPLIANCE_DATABASE_URL"].split("host=")[1]
    assert _mounts(services["appliance"])[socket_dir][0] == _mounts(services["postgres"])["/var/run/postgresql"][0]
    assert services["postgres"]["network_mode"] == "none"
    # The key file is not in the home, whose models directory vLLM mounts.
    assert not env["APPLIANCE_KEY_FILE"].startswith(env["APPLIANCE_HOME"] + "/")
    assert Path(env["APPLIANCE_KEY_FILE"]).parent.as_posix() in _mounts(services["appliance"])


def test_vllm_loads_lora_adapters_at_run_time_from_the_appliance_shm(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    vllm, appliance = services["vllm"], services["appliance"]
    # `vllm serve`, behind the wrapper that sets its API key (test_vllm_and_the_appliance_share_one_api_key).
    assert vllm["entrypoint"][:2] == ["sh", "-c"] and vllm["entrypoint"][3:] == ["vllm", "serve"]
    flags = cli_flags(vllm["command"])
    assert "enable-lora" in flags
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert vllm["environment"]["HF_HUB_OFFLINE"] == "1"
    # The appliance writes adapters to /dev/shm (0700): vLLM must share it and the uid.
    assert vllm["ipc"] == "service:appliance" and appliance["ipc"] == "shareable"
    assert vllm["user"] == appliance["user"]
    # The appliance's client refuses adapters above its max_lora_rank; vLLM must accept that rank.
    assert int(flags["max-lora-rank"]) == ENGINE_MAX_LORA_RANK
    assert flags["max-cpu-loras"] == appliance["environment"]["APPLIANCE_MAX_RESIDENT_ADAPTERS"]
    assert int(flags["max-cpu-loras"]) <= MAX_CPU_LORAS
    # It serves the base model from the appliance's models directory, read-only, under its catalogue name.
    model_dir = Path(vllm["command"][0])
    assert flags["served-model-name"] == model_dir.name
    home_source = _mounts(appliance)[appliance["environment"]["APPLIANCE_HOME"]][0]
    source, read_only = _mounts(vllm)[model_dir.parent.as_posix()]
    assert read_only and source == f"{home_source}/models"


def test_vllm_is_the_tested_release(rendered: dict[str, Any], tmp_path: Path) -> None:
    assert rendered["services"]["vllm"]["image"] == VLLM_IMAGE
    # compose.yaml's own default, without env.example.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    code, out, err = compose_config(COMPOSE_DIR / "compose.yaml", empty)
    assert code == 0, err
    assert yaml.safe_load(out)["services"]["vllm"]["image"] == VLLM_IMAGE


def test_vllm_and_the_appliance_share_one_api_key(rendered: dict[str, Any], tmp_path: Path) -> None:
    services = rendered["services"]
    vllm, appliance = services["vllm"], services["appliance"]
    # One file-based secret, in both containers; the appliance is told where.
    key_path = appliance["environment"]["APPLIANCE_VLLM_API_KEY_FILE"]
    secret = _secrets(appliance)[key_path]
    assert Path(rendered["secrets"][secret]["file"]).parent == COMPOSE_DIR / "secrets"
    assert _secrets(vllm).get(key_path) == secret
    # vLLM reads it into VLLM_API_KEY (not --api-key: the command line shows in `ps`), and never starts without it.
    assert "VLLM_API_KEY" not in vllm["environment"] and "api-key" not in cli_flags(vllm["command"])
    check_key_wrapper(_unescape(vllm["entrypoint"][2]), key_path, tmp_path, "compose.yaml")


def test_vllm_starts_as_a_uid_without_a_name(rendered: dict[str, Any]) -> None:
    vllm = rendered["services"]["vllm"]
    writable = [target for target, (_, read_only) in _mounts(vllm).items() if not read_only]
    writable += [tmpfs.split(":")[0] for tmpfs in vllm.get("tmpfs", [])]
    check_vllm_start_env(vllm["environment"], writable, "compose.yaml")


def test_hardening(rendered: dict[str, Any]) -> None:
    services = rendered["services"]
    for name, service in services.items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    assert services["appliance"]["read_only"] is True
    assert services["appliance"]["user"] == "10001:10001"
    # vLLM reaches nothing but the appliance; the database has no network at all.
    assert rendered["networks"]["backend"]["internal"] is True
    assert list(services["vllm"]["networks"]) == ["backend"]
    # GPUs are given explicitly, training and serving apart.
    gpus = {}
    for name in ("appliance", "vllm"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus[name] = device["device_ids"]
    assert gpus["appliance"] != gpus["vllm"]
