"""What the deploy tests share: finding the validators, and checking the settings an artefact sets.

A missing validator fails its test with the install command, so that CI (where ``make test``
installs them) never passes by skipping; ``ALLOW_MISSING_VALIDATORS=1`` turns that into a skip
for a developer's machine without them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from appliance.settings import describe_settings, load_settings
from serving.vllm_engine import VllmEngine

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OPT_OUT = "ALLOW_MISSING_VALIDATORS"
#: The largest adapter rank the appliance's vLLM client accepts: vLLM's --max-lora-rank must match.
ENGINE_MAX_LORA_RANK = inspect.signature(VllmEngine).parameters["max_lora_rank"].default


def missing_validator(what: str, install: str) -> NoReturn:
    """Fail (or, with ``ALLOW_MISSING_VALIDATORS=1``, skip) because ``what`` is not installed."""
    message = f"{what} is not installed: {install}"
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{message}; skipped because {OPT_OUT}=1")
    pytest.fail(f"{message}; or set {OPT_OUT}=1 to skip this test instead", pytrace=False)


def import_validator(module: str, what: str) -> ModuleType:
    """A validator that comes with ``.[dev]``; missing, it fails the test (see :func:`missing_validator`)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing_validator(what, "pip install -e '.[dev]' (`make test` does it)")


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def check_appliance_env(env: Mapping[str, str], where: str) -> None:
    """Every ``APPLIANCE_*`` variable in ``env`` exists, and together they load as settings."""
    known = {name for name, _, _ in describe_settings()}
    appliance_env = {k: str(v) for k, v in env.items() if k.startswith("APPLIANCE_")}
    unknown = sorted(set(appliance_env) - known)
    assert not unknown, f"{where} sets variables the appliance does not know: {unknown}"
    load_settings(appliance_env)  # raises SettingsError naming every bad value


def cli_flags(argv: list[str]) -> dict[str, str]:
    """``--name`` -> value for ``--name=value`` and ``--name value``; ``""`` for a bare switch."""
    flags = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            flags[name] = value if eq else ("" if following.startswith("--") else following)
    return flags
