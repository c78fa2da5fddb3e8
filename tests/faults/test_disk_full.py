"""A disk that fills up while an upload's blob is written: 507 with an error body, nothing half-written kept.

Two realisations of "no space": a 256 KiB tmpfs mounted on the blob directory of the in-process app
(ENOSPC; needs root, skipped without), and ``appliance serve`` run under ``RLIMIT_FSIZE`` with SIGXFSZ
ignored, so that writes past the limit fail with EFBIG (always runs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from appliance.audit.models import AuditEvent
from appliance.audit.service import verify_chain
from appliance.bootstrap import open_initialized
from appliance.files.models import StoredFile
from appliance.identity.roles import Role
from appliance.storage.models import DataKey
from tests.cli_helpers import Server
from tests.conftest import bearer, free_port, make_settings
from tests.faults.conftest import assert_audit_verifies


def big_upload(size: int) -> bytes:
    """JSONL of about ``size`` bytes that the scanner clears quickly (long lines, no entities)."""
    line = json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 40}).encode() + b"\n"
    return line * (size // len(line) + 1)


def small_upload() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "4"}]}).encode() + b"\n"


def post(http, token: str, data: bytes):
    return http.post("/v1/files", headers=bearer(token), data={"purpose": "fine-tune"},
                     files={"file": ("data.jsonl", data, "application/jsonl")})


def assert_disk_full_refused_and_recovered(http, token: str, db, blobs_dir: Path, size: int) -> None:
    resp = post(http, token, big_upload(size))
    assert resp.status_code == 507, resp.text
    error = resp.json()["error"]
    assert error["code"] == "insufficient_storage" and "free space" in error["message"], error
    # Nothing half-written: no blob, no temporary, no file or key row, nothing listed.
    assert [p for p in blobs_dir.rglob("*") if p.is_file()] == []
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(StoredFile)) == 0
        assert s.scalar(select(func.count()).select_from(DataKey)) == 0
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.action == "file.reject")).all()
        assert event.outcome == "failure" and event.details["code"] == "insufficient_storage"
    assert http.get("/v1/files", headers=bearer(token)).json()["data"] == []
    # The server keeps working: a small upload fits and is stored.
    small = post(http, token, small_upload())
    assert small.status_code == 201, small.text
    assert [f["id"] for f in http.get("/v1/files", headers=bearer(token)).json()["data"]] == [small.json()["id"]]
    assert http.get(f"/v1/files/{small.json()['id']}/content", headers=bearer(token)).content == small_upload()
    assert verify_chain(db).ok


def test_upload_onto_a_full_tmpfs_is_507_and_leaves_nothing(client, state, make_token):
    blobs_dir = state.settings.blobs_dir
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to mount a tmpfs with")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(blobs_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        token = make_token("olivia", Role.DATA_OWNER, "acme")
        assert_disk_full_refused_and_recovered(client, token, state.db, blobs_dir, size=1024 * 1024)
    finally:
        subprocess.run(["umount", "-l", str(blobs_dir)], check=True)


FSIZE_LIMIT = 1024 * 1024
#: ``appliance serve`` with a file-size limit on every file it writes; SIGXFSZ ignored so writes fail with EFBIG.
LIMITED_SERVE = (
    "import resource, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE_LIMIT}, {FSIZE_LIMIT})); "
    "from appliance.cli.main import main; sys.exit(main())"
)


@pytest.mark.slow
def test_upload_past_a_file_size_limit_is_507_and_the_server_keeps_working(fault_home):
    import httpx

    port = free_port()
    server = Server(fault_home.path, port, argv=[sys.executable, "-c", LIMITED_SERVE, "serve", "--port", str(port)])
    settings = make_settings(fault_home.path)
    db = open_initialized(settings)
    try:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=120) as http:
            assert_disk_full_refused_and_recovered(http, fault_home.owner, db, settings.blobs_dir,
                                                   size=2 * FSIZE_LIMIT)
    finally:
        server.stop()
        db.dispose()
    assert_audit_verifies(fault_home.path)
