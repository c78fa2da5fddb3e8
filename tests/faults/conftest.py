"""Helpers of the fault tests: a home set up through the library, planted-plaintext search, the audit check.

The faults themselves are real: ``appliance`` processes killed with SIGKILL, a disk that fills up.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.bootstrap import initialize, open_initialized
from appliance.identity.roles import Role
from appliance.identity.service import IdentityService
from appliance.settings import Settings
from tests.cli_helpers import run_cli
from tests.conftest import CLI_CTX, make_settings


@dataclass(frozen=True)
class FaultHome:
    """An initialised home with project ``acme`` and a data owner's token in it."""

    path: Path
    settings: Settings
    admin: str
    owner: str


@pytest.fixture
def fault_home(tmp_path: Path) -> FaultHome:
    path = tmp_path / "var"
    settings = make_settings(path)
    initialize(settings, CLI_CTX)
    db = open_initialized(settings)
    try:
        identity = IdentityService(db)
        identity.create_project(CLI_CTX, "acme")
        identity.create_user(CLI_CTX, "olivia")
        identity.grant(CLI_CTX, "olivia", Role.DATA_OWNER, "acme")
        owner = identity.create_token(CLI_CTX, "olivia", Role.DATA_OWNER, "acme")[1]
    finally:
        db.dispose()
    return FaultHome(path, settings, settings.home.admin_token_file.read_text().strip(), owner)


def planted_values(n: int) -> list[str]:
    """Random words that can only be on disk if plaintext was written there."""
    return [f"zqx{secrets.token_hex(8)}" for _ in range(n)]


def record(i: int, word: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": f"Internal code word {word} for vault {i}"},
                                    {"role": "assistant", "content": f"Acknowledged {word}"}]}).encode() + b"\n"


def assert_not_on_disk(roots: Iterable[Path], words: Iterable[str]) -> int:
    """Fail if any of ``words`` is in any file under ``roots``; returns how many files were read."""
    needles = [w.encode() for w in words]
    seen = 0
    for root in roots:
        for path in root.rglob("*"):
            try:
                if not path.is_file():
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            seen += 1
            for needle in needles:
                assert needle not in data, f"planted value in plaintext in {path}"
    return seen


def assert_audit_verifies(home: Path) -> None:
    """The real ``appliance audit verify`` walks the chain and exits 0."""
    proc = run_cli(home, "audit", "verify", check=False)
    assert proc.returncode == 0, f"audit verify exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
