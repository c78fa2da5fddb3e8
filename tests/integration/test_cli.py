"""The ``appliance`` command line, run as users run it."""

from __future__ import annotations

import re
import stat

import pytest

from tests.cli_helpers import run_cli
from tests.db_helpers import is_postgres


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_private_home_key_and_admin_token_and_is_idempotent(tmp_path):
    home = tmp_path / "var"
    first = run_cli(home, "init")
    assert "Initialised" in first.stdout and "admin.token" in first.stdout
    key, token, db = home / "keys" / "master.key", home / "admin.token", home / "appliance.db"
    assert _mode(key) == 0o600 and _mode(token) == 0o600 and _mode(home) == 0o700
    assert is_postgres(home) or _mode(db) == 0o600
    value = token.read_text().strip()
    assert re.fullmatch(r"apl_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", value)
    assert value not in first.stdout + first.stderr
    second = run_cli(home, "init")
    assert "Already initialised" in second.stdout
    assert token.read_text().strip() == value and key.stat().st_mtime_ns == key.stat().st_mtime_ns


def test_tokens_create_prints_only_the_token_and_revoke_works(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    run_cli(home, "projects", "add", "acme")
    run_cli(home, "users", "add", "alice", "--role", "trainer", "--project", "acme")
    created = run_cli(home, "tokens", "create", "--user", "alice", "--role", "trainer", "--project", "acme",
                      "--expires-in", "30d")
    lines = created.stdout.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"apl_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", lines[0])
    token_id = lines[0].split("_")[1]
    listed = run_cli(home, "tokens", "list").stdout
    assert token_id in listed and "active" in listed and lines[0] not in listed
    assert "revoked token" in run_cli(home, "tokens", "revoke", token_id).stdout
    assert re.search(rf"{token_id}.*revoked", run_cli(home, "tokens", "list").stdout)


def test_cli_errors_name_the_argument_and_exit_2(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    run_cli(home, "users", "add", "bob")
    no_grant = run_cli(home, "tokens", "create", "--user", "bob", "--role", "consumer", "--project", "acme", check=False)
    assert no_grant.returncode == 2 and "project 'acme' not found" in no_grant.stderr
    run_cli(home, "projects", "add", "acme")
    no_grant = run_cli(home, "tokens", "create", "--user", "bob", "--role", "consumer", "--project", "acme", check=False)
    assert no_grant.returncode == 2 and "appliance users grant bob --role consumer --project acme" in no_grant.stderr
    assert no_grant.stdout == ""
    bad = run_cli(home, "tokens", "create", "--user", "admin", "--role", "admin", "--expires-in", "soon", check=False)
    assert bad.returncode == 2 and "--expires-in" in bad.stderr and "'soon'" in bad.stderr
    scoped = run_cli(home, "users", "grant", "bob", "--role", "admin", "--project", "acme", check=False)
    assert scoped.returncode == 2 and "global" in scoped.stderr
    dup = run_cli(home, "projects", "add", "acme", check=False)
    assert dup.returncode == 2 and "already exists" in dup.stderr


def test_commands_before_init_say_so(tmp_path):
    proc = run_cli(tmp_path / "nothing", "users", "list", check=False)
    assert proc.returncode == 2 and "appliance init" in proc.stderr


def test_invalid_settings_are_reported_naming_the_variable(tmp_path):
    proc = run_cli(tmp_path / "var", "init", check=False, APPLIANCE_PORT="http", APPLIANCE_LOG_LEVEL="chatty")
    assert proc.returncode == 2
    assert "APPLIANCE_PORT='http'" in proc.stderr and "APPLIANCE_LOG_LEVEL='chatty'" in proc.stderr


def test_key_file_readable_by_others_is_refused(tmp_path):
    home = tmp_path / "var"
    run_cli(home, "init")
    (home / "keys" / "master.key").chmod(0o644)
    proc = run_cli(home, "users", "list", check=False)
    assert proc.returncode == 2 and "0644" in proc.stderr and "chmod 600" in proc.stderr


@pytest.mark.slow  # minutes of compute and no database behaviour of its own: the SQLite pass only
def test_scan_dry_run_prints_the_report_without_uploading(tmp_path):
    import json

    home = tmp_path / "var"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "mail me at sam.doe@example.com"},
                                             {"role": "assistant", "content": "ok"}]}) + "\n"
                    + json.dumps({"text": "key AKIAIOSFODNN7EXAMPLE"}) + "\n")
    human = run_cli(home, "scan", str(data), check=False)
    assert human.returncode == 1 and "REJECTED" in human.stdout and "AWS_ACCESS_KEY_ID" in human.stdout
    out = run_cli(home, "scan", str(data), "--json", check=False)
    doc = json.loads(out.stdout)
    assert {(f["record"], f["field"], f["entity_type"]) for f in doc["findings"]} >= {
        (0, "messages[0].content", "EMAIL_ADDRESS"), (1, "text", "AWS_ACCESS_KEY_ID")}
    assert "sam.doe@example.com" not in out.stdout and "AKIAIOSFODNN7EXAMPLE" not in out.stdout
    assert not home.exists()  # a dry run touches no appliance state


@pytest.mark.slow
@pytest.mark.no_database  # a dry run: the SQLite pass only
def test_scan_imports_only_what_scanning_needs(tmp_path):
    """``appliance scan`` starts in seconds: none of the training, serving or server stacks is imported
    (issue 23: it took 13 s to start on a one-record file)."""
    import json
    import subprocess
    import sys

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "nothing to find here"}) + "\n")
    heavy = ["transformers", "diffusers", "peft", "bitsandbytes", "accelerate", "safetensors", "litestar", "uvicorn",
             "openai", "ray", "vllm"]
    probe = ("import sys\nfrom click.testing import CliRunner\nfrom appliance.cli.main import main\n"
             f"r = CliRunner().invoke(main, ['scan', {str(data)!r}])\nassert r.exit_code == 0, r.output\n"
             f"print([m for m in {heavy!r} if sys.modules.get(m) is not None])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "APPLIANCE_HOME": str(tmp_path / "var")})
    assert out.stdout.strip().splitlines()[-1] == "[]"
