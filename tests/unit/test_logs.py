"""Logs: readable on a terminal, JSON for machines, the file always JSON, secrets scrubbed either way."""

from __future__ import annotations

import io
import json
import logging

import pytest

from appliance import logs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize(("stream", "fmt", "readable"), [
    (_Terminal(), "auto", True), (io.StringIO(), "auto", False), (_Terminal(), "json", False),
    (io.StringIO(), "console", True),
])
def test_auto_is_readable_on_a_terminal_and_json_otherwise(monkeypatch, tmp_path, stream, fmt, readable):
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure_logging("INFO", fmt, tmp_path)
    logging.getLogger("appliance.test").info("job started", extra={"job_id": "ftjob-1",
                                                                    "auth": "Bearer " + "a" * 40})
    line = stream.getvalue().strip().splitlines()[-1]
    if readable:
        assert " INFO    appliance.test: job started job_id=ftjob-1" in line
    else:
        assert json.loads(line)["msg"] == "job started"
    assert "a" * 40 not in stream.getvalue()  # scrubbed on stderr
    on_disk = (tmp_path / "appliance.log").read_text().strip().splitlines()[-1]
    assert json.loads(on_disk)["job_id"] == "ftjob-1" and "a" * 40 not in on_disk  # the file: always JSON
