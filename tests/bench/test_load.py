"""``bench/load.py`` as ``make test`` runs it: a short run with fewer clients, and not one error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, database_url_for


@pytest.mark.slow
def test_load_benchmark_smoke_run_has_no_errors(tmp_path):
    home, figures = tmp_path / "home", tmp_path / "load.json"
    argv = [sys.executable, str(REPO / "bench" / "load.py"), "--seconds", "5", "--clients", "10",
            "--home", str(home), "--json", str(figures)]
    if url := database_url_for(home):
        argv += ["--database-url", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    result = json.loads(figures.read_text())
    ops = result["ops"]
    assert ops["all"]["errors"] == 0, result["first_errors"]
    assert all(ops[name]["count"] > 0 for name in ("upload", "list_jobs", "chat")), ops
    assert ops["all"]["p50_ms"] <= ops["all"]["p95_ms"] <= ops["all"]["p99_ms"]
    assert result["meta"]["audit"].startswith("verified"), result["meta"]["audit"]
    assert "| chat |" in proc.stdout  # the report table
