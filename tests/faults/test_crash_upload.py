"""SIGKILL of ``appliance serve`` while a large upload streams in.

SIGKILL during training is covered by
``tests/integration/test_jobs.py::test_sigkill_of_the_whole_server_leaves_the_job_resumable``
(and a killed worker alone by ``test_killed_worker_leaves_job_failed_resumable_and_resume_finishes``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from appliance.storage.blobs import TMP_PREFIX
from tests.cli_helpers import Server, cli_env
from tests.conftest import bearer, free_port
from tests.faults.conftest import FaultHome, assert_audit_verifies, assert_not_on_disk, planted_values, record
from tests.timing import Deadline

pytestmark = pytest.mark.slow  # real processes started and killed

BOUNDARY = "faultboundary7f3a"


def endless_upload(words: list[str], stop: threading.Event) -> Iterator[bytes]:
    """A multipart body whose file part never ends: the server is killed while it streams."""
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/jsonl\r\n\r\n").encode()
    i = 0
    while not stop.is_set():
        chunk = b"".join(record(i + k, words[(i + k) % len(words)]) for k in range(200))
        i += 200
        yield chunk


def temporaries(home: FaultHome) -> list:
    return [p for p in home.settings.blobs_dir.glob(f"*/{TMP_PREFIX}*") if p.is_file()]


#: What ``appliance serve`` does first: sweep the blob temporaries (here without serving afterwards).
SWEEP = ("from appliance.crypto.envelope import FileKeyProvider; from appliance.settings import load_settings; "
         "from appliance.storage.blobs import BlobStore; s = load_settings(); "
         "print(BlobStore(s.blobs_dir, FileKeyProvider(s.key_file)).sweep_temporaries())")


def sweep_as_a_starting_replica(home: FaultHome) -> int:
    proc = subprocess.run([sys.executable, "-c", SWEEP], env=cli_env(home.path), capture_output=True, text=True,
                          timeout=60, check=True)
    return int(proc.stdout)


def test_sigkill_during_a_streamed_upload_leaves_no_file_no_plaintext_and_a_valid_chain(fault_home, tmp_path):
    words = planted_values(8)
    server_tmp = tmp_path / "server-tmp"  # where a spooling form parser would put the upload
    server_tmp.mkdir()
    port = free_port()
    server = Server(fault_home.path, port, TMPDIR=str(server_tmp))
    stop, outcome = threading.Event(), {}

    def send() -> None:
        try:
            resp = httpx.post(f"{server.base_url}/v1/files", headers={
                **bearer(fault_home.owner), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                content=endless_upload(words, stop), timeout=120)
            outcome["status"] = resp.status_code
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    try:
        server.wait_healthy()
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        # Kill once several encrypted segments of the file are on disk, the upload still streaming.
        deadline = Deadline(120)
        while not any(p.stat().st_size > 200_000 for p in temporaries(fault_home)):
            assert deadline, f"the upload never reached the disk:\n{server.output()}"
            assert sender.is_alive(), outcome
            time.sleep(0.1)
        # A replica starting on the same storage meanwhile leaves the live upload alone...
        assert sweep_as_a_starting_replica(fault_home) == 0 and temporaries(fault_home)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        stop.set()
        sender.join(30)
    finally:
        server.stop()
    assert "status" not in outcome, f"the upload completed ({outcome}) before the kill"
    leftovers = temporaries(fault_home)
    assert leftovers, "the kill left no partial blob: nothing was tested"
    assert_not_on_disk([fault_home.path, server_tmp], words)  # ciphertext only, even half-written

    restarted = Server(fault_home.path, port, TMPDIR=str(server_tmp))
    try:
        restarted.wait_healthy()
        assert temporaries(fault_home) == [], "the restart did not sweep the interrupted write"
        assert [p for p in fault_home.settings.blobs_dir.rglob("*") if p.is_file()] == []
        http = httpx.Client(base_url=restarted.base_url, headers=bearer(fault_home.owner), timeout=60)
        assert http.get("/v1/files").json()["data"] == []
        small = http.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("small.jsonl", record(0, "hello"))})
        assert small.status_code == 201, small.text
        assert [f["id"] for f in http.get("/v1/files").json()["data"]] == [small.json()["id"]]
    finally:
        restarted.stop()
    assert_not_on_disk([fault_home.path, server_tmp], words)
    assert_audit_verifies(fault_home.path)
