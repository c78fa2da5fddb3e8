"""Worker tmpfs directories left by a killed control plane are swept; live ones are not."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from appliance.jobs.sandbox import TMPDIR_PREFIX, _process_identity, sweep_orphaned_tmpdirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _workdir(root, name: str, owner: str | None):
    path = root / f"{TMPDIR_PREFIX}{name}"
    (path / "inductor").mkdir(parents=True)
    (path / "inductor" / "data").write_bytes(b"x")
    if owner is not None:
        (path / ".owner").write_text(owner)
    return path


def test_sweep_removes_only_orphans(tmp_path):
    dead = _dead_pid()
    live = _workdir(tmp_path, "live", _process_identity(os.getpid()))
    orphan = _workdir(tmp_path, "orphan", f"{dead} 12345")
    reused_pid = _workdir(tmp_path, "reused", f"{os.getpid()} 1")  # our pid, another start time
    fresh_unowned = _workdir(tmp_path, "fresh", None)
    old_unowned = _workdir(tmp_path, "old", None)
    old = time.time() - 3600
    os.utime(old_unowned, (old, old))
    busy = _workdir(tmp_path, "busy", f"{dead} 12345")  # owner gone, its worker still winding down
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=busy)
    unrelated = tmp_path / "something-else"
    unrelated.mkdir()
    try:
        removed = sweep_orphaned_tmpdirs(tmp_path)
    finally:
        worker.kill()
        worker.wait()
    assert sorted(removed) == sorted([orphan, reused_pid, old_unowned])
    for path in removed:
        assert not path.exists()
    for kept in (live, fresh_unowned, busy, unrelated):
        assert kept.exists(), kept
    # Once its worker is gone, the busy directory goes too.
    assert sweep_orphaned_tmpdirs(tmp_path) == [busy]


def test_process_identity_names_live_processes_only():
    me = _process_identity(os.getpid())
    assert me is not None and me.split()[0] == str(os.getpid())
    assert _process_identity(os.getpid()) == me  # stable
    assert _process_identity(_dead_pid()) is None
