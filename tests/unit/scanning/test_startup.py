"""`appliance scan` imports only what scanning needs: presidio without its transformers engine."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, time
from click.testing import CliRunner
from appliance.cli.main import main
result = CliRunner().invoke(main, ["scan", sys.argv[1]])
assert result.exit_code == 0, result.output
assert "EMAIL_ADDRESS" in result.output, result.output
print("transformers loaded:", "transformers" in sys.modules)
import transformers  # still importable afterwards, whole (training and serving need it)
from transformers import pipeline  # noqa: F401
print("pipeline ok")
"""


def test_scan_does_not_load_transformers_and_leaves_it_importable(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "Write to ops@build01.local"}\n')
    done = subprocess.run([sys.executable, "-c", PROBE, str(data)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformers loaded: False" in done.stdout and "pipeline ok" in done.stdout, done.stdout
