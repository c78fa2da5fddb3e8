import os
from pathlib import Path

import pytest

from appliance.errors import SettingsError
from appliance.settings import describe_settings, load_settings


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings({})
    assert s.home.home == tmp_path / "var"
    assert s.server.host == "127.0.0.1" and s.server.port == 8080
    assert s.database_url == f"sqlite:///{tmp_path / 'var' / 'appliance.db'}"
    assert s.key_file == tmp_path / "var" / "keys" / "master.key"
    assert s.log.level == "INFO"


def test_every_concern_reads_its_variables(tmp_path):
    s = load_settings({
        "APPLIANCE_HOME": str(tmp_path / "h"),
        "APPLIANCE_DATABASE_URL": "postgresql+psycopg://app@db/appliance",
        "APPLIANCE_HOST": "0.0.0.0",
        "APPLIANCE_PORT": "9000",
        "APPLIANCE_KEY_FILE": str(tmp_path / "k.key"),
        "APPLIANCE_LOG_LEVEL": "debug",
        "APPLIANCE_AUTH_MAX_FAILURES": "3",
    })
    assert s.home.home == tmp_path / "h"
    assert s.database_url.startswith("postgresql+psycopg://")
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9000)
    assert s.key_file == tmp_path / "k.key"
    assert s.log.level == "DEBUG"
    assert s.auth.max_failures == 3


def test_all_problems_reported_at_once_naming_the_variable_and_value():
    with pytest.raises(SettingsError) as info:
        load_settings({
            "APPLIANCE_PORT": "eighty",
            "APPLIANCE_LOG_LEVEL": "LOUD",
            "APPLIANCE_DATABASE_URL": "appliance.db",
            "APPLIANCE_PROT": "1",
        })
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    assert "APPLIANCE_PORT='eighty': expected an integer between 1 and 65535" in problems
    assert "APPLIANCE_LOG_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR" in problems
    assert "APPLIANCE_DATABASE_URL='appliance.db'" in problems
    assert "unknown variable(s) APPLIANCE_PROT" in problems


def test_port_out_of_range():
    with pytest.raises(SettingsError, match="APPLIANCE_PORT='70000'"):
        load_settings({"APPLIANCE_PORT": "70000"})


def test_described_settings_cover_every_variable():
    names = [name for name, _, _ in describe_settings()]
    assert len(names) == len(set(names))
    assert {"APPLIANCE_HOME", "APPLIANCE_DATABASE_URL", "APPLIANCE_HOST", "APPLIANCE_PORT",
            "APPLIANCE_KEY_FILE", "APPLIANCE_LOG_LEVEL"} <= set(names)
    assert all(help_ for _, _, help_ in describe_settings())
    assert isinstance(load_settings({}).home.home, Path)


def test_the_ray_executor_needs_its_address_and_token_and_reports_all_problems(tmp_path):
    with pytest.raises(SettingsError) as info:
        load_settings({"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_EXECUTOR": "ray",
                       "APPLIANCE_RAY_CALLBACK_ADDRESS": "0.0.0.0:7070"})
    problems = "\n".join(info.value.problems)
    for name in ("APPLIANCE_RAY_ADDRESS=''", "APPLIANCE_RAY_TOKEN_FILE=''", "APPLIANCE_RAY_CALLBACK_ADVERTISE=''",
                 "APPLIANCE_RAY_NODE_KEY_FILE=''"):
        assert name in problems
    assert "head -c 32 /dev/urandom" in problems  # how to make the node key
    token = tmp_path / "ray.token"
    token.write_text("t0ken\n")
    node_key = tmp_path / "node.key"
    ray = {"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_EXECUTOR": "ray", "APPLIANCE_RAY_ADDRESS": "http://127.0.0.1:8265",
           "APPLIANCE_RAY_TOKEN_FILE": str(token), "APPLIANCE_RAY_NODE_KEY_FILE": str(node_key)}
    node_key.write_bytes(b"k" * 16)
    node_key.chmod(0o600)
    with pytest.raises(SettingsError, match="APPLIANCE_RAY_NODE_KEY_FILE=.*holds 16 bytes, need at least 32"):
        load_settings(ray)
    node_key.write_bytes(os.urandom(32))
    node_key.chmod(0o644)
    with pytest.raises(SettingsError, match="APPLIANCE_RAY_NODE_KEY_FILE=.*mode 0644 lets other users read it"):
        load_settings(ray)
    node_key.chmod(0o400)
    settings = load_settings(ray)
    assert settings.jobs.executor == "ray" and settings.jobs.ray_callback_address == "127.0.0.1:0"
    with pytest.raises(SettingsError, match="APPLIANCE_RAY_CALLBACK_ADDRESS='nowhere': expected host:port"):
        load_settings({**ray, "APPLIANCE_RAY_CALLBACK_ADDRESS": "nowhere"})
    # The local executor ignores the Ray variables.
    assert load_settings({"APPLIANCE_HOME": str(tmp_path)}).jobs.executor == "local"


def test_retention_sweep_interval():
    assert load_settings({}).retention.sweep_interval_s == 3600
    assert load_settings({"APPLIANCE_RETENTION_SWEEP_S": "0"}).retention.sweep_interval_s == 0  # only the CLI
    with pytest.raises(SettingsError, match="APPLIANCE_RETENTION_SWEEP_S='-5': expected an integer of at least 0"):
        load_settings({"APPLIANCE_RETENTION_SWEEP_S": "-5"})


def test_vllm_url_lists_serving_replicas_and_each_is_checked(tmp_path):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_SERVING_ENGINE": "vllm",
                       "APPLIANCE_VLLM_URL": "http://127.0.0.1:8000, http://127.0.0.1:8001/"})
    assert s.serving.vllm_urls == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    assert s.serving.vllm_urls_for("any-base") == ["http://127.0.0.1:8000", "http://127.0.0.1:8001"]
    per_base = load_settings({"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_SERVING_ENGINE": "vllm",
                              "APPLIANCE_VLLM_URL": "llama=http://127.0.0.1:8000,qwen=http://127.0.0.1:8001"})
    assert per_base.serving.vllm_urls_for("qwen") == ["http://127.0.0.1:8001"]
    with pytest.raises(SettingsError, match="listed twice"):
        load_settings({"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_SERVING_ENGINE": "vllm",
                       "APPLIANCE_VLLM_URL": "llama=http://127.0.0.1:8000,qwen=http://127.0.0.1:8000"})
    assert s.serving.reconcile_s == 30 and s.serving.shm_dir == Path("/dev/shm")
    with pytest.raises(SettingsError) as info:
        load_settings({"APPLIANCE_HOME": str(tmp_path), "APPLIANCE_SERVING_ENGINE": "vllm",
                       "APPLIANCE_VLLM_URL": "http://a:8000,b:8001",
                       "APPLIANCE_VLLM_API_KEY_FILE": str(tmp_path / "missing.token"),
                       "APPLIANCE_SERVING_RECONCILE_S": "-1"})
    problems = "\n".join(info.value.problems)
    assert "APPLIANCE_VLLM_URL='http://a:8000,b:8001': expected http(s) URLs" in problems
    assert "APPLIANCE_VLLM_API_KEY_FILE=" in problems and "APPLIANCE_SERVING_RECONCILE_S='-1'" in problems
