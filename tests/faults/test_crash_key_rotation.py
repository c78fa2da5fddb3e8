"""SIGKILL of ``appliance keys rotate`` part-way, with many wrapped data keys to re-wrap."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
from sqlalchemy import select

from appliance.audit.service import verify_chain
from appliance.crypto.envelope import FileKeyProvider, WrappedKey, new_data_key
from appliance.crypto.keyfile import load_keyring
from appliance.identity.roles import Role
from appliance.storage.blobs import key_context
from appliance.storage.models import DataKey
from tests.cli_helpers import APPLIANCE, cli_env, run_cli
from tests.conftest import bearer
from tests.faults.conftest import assert_audit_verifies
from tests.timing import Deadline

pytestmark = pytest.mark.slow  # real processes started and killed

FILES = 6
#: Data keys per uploaded file: its stored content, its kept original and its quality sketch.
KEYS_PER_FILE = 3
#: Wrapped keys of (ciphertext-less) checkpoints besides the files: enough that re-wrapping takes a while.
EXTRA_KEYS = 20_000
KILLS = 3


def jsonl(i: int) -> bytes:
    return (json.dumps({"messages": [{"role": "user", "content": f"rotation {i}?"},
                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n").encode()


def add_wrapped_keys(state, n: int) -> None:
    keys = state.blobs.keys
    with state.db.transaction() as s:
        for i in range(n):
            object_id = f"ftckpt-fault{i:08d}"
            sealed = keys.wrap(new_data_key(), key_context(object_id, "acme"))
            s.add(DataKey(object_id=object_id, project="acme", kind="checkpoint", kek_id=sealed.kek_id,
                          wrapped=sealed.blob))


def kek_count(key_file) -> int:
    try:
        return len(json.loads(key_file.read_bytes())["keys"])
    except (OSError, ValueError):  # being replaced at this instant
        return -1


def rotate_and_kill(home, key_file, delay: float) -> tuple[float, bool]:
    """Run ``appliance keys rotate``; SIGKILL it ``delay`` s after its new KEK is in the key file.

    Returns the seconds from then to its end, and whether it was killed (False: it finished first).
    """
    before = kek_count(key_file)
    proc = subprocess.Popen([str(APPLIANCE), "keys", "rotate"], env=cli_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = Deadline(60)
    while kek_count(key_file) <= before and proc.poll() is None:
        assert deadline, "rotation never added its KEK"
        time.sleep(0.005)
    added = time.monotonic()
    while proc.poll() is None and time.monotonic() - added < delay:
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return time.monotonic() - added, killed


def assert_every_object_opens_with_one_key(client, state, owner, files: dict[str, bytes]) -> set[str]:
    """Each data key names one KEK that is in the key file and opens it; files read back through the API."""
    for file_id, body in files.items():
        resp = client.get(f"/v1/files/{file_id}/content", headers=bearer(owner))
        assert resp.status_code == 200 and resp.content == body, resp.text
    fresh = FileKeyProvider(state.settings.key_file)
    ring = load_keyring(state.settings.key_file)
    with state.db.read() as s:
        rows = list(s.scalars(select(DataKey).where(DataKey.wrapped.is_not(None))))
    assert len(rows) == FILES * KEYS_PER_FILE + EXTRA_KEYS
    for row in rows:
        assert row.kek_id in ring.keys
        fresh.unwrap(WrappedKey(row.kek_id, row.wrapped), key_context(row.object_id, row.project))
    return {row.kek_id for row in rows}


def test_sigkill_during_key_rotation_keeps_everything_readable_and_a_rerun_finishes(client, state, make_token):
    rng = random.Random(seed := random.randrange(2**32))
    owner = make_token("olivia", Role.DATA_OWNER, "acme")
    files = {}
    for i in range(FILES):
        resp = client.post("/v1/files", headers=bearer(owner), data={"purpose": "fine-tune"},
                           files={"file": (f"r{i}.jsonl", jsonl(i))})
        assert resp.status_code == 201, resp.text
        files[resp.json()["id"]] = jsonl(i)
    add_wrapped_keys(state, EXTRA_KEYS)
    home, key_file = state.settings.home.home, state.settings.key_file
    first_kek = load_keyring(key_file).active
    # Kill the first run as soon as its KEK is saved, the next ones at random points of the re-wrap.
    outcomes = []
    for k in range(KILLS):
        ran, killed = rotate_and_kill(home, key_file, delay=0 if k == 0 else rng.uniform(0.1, 1.0))
        keks = assert_every_object_opens_with_one_key(client, state, owner, files)
        assert len(keks) == 1, (seed, k, "a rotation committed part of its re-wrap")
        outcomes.append((round(ran, 2), "killed" if killed else "finished",
                         "re-wrapped" if keks != {first_kek} else "rolled back"))
        first_kek = next(iter(keks))
    assert any(o[1:] == ("killed", "rolled back") for o in outcomes), (seed, outcomes)
    # A re-run completes: one KEK left, every object under it and readable.
    out = run_cli(home, "keys", "rotate").stdout
    assert f"{FILES * KEYS_PER_FILE + EXTRA_KEYS} data keys re-wrapped" in out, out
    ring = load_keyring(key_file)
    assert len(ring.keys) == 1
    assert not list(key_file.parent.glob(".*.tmp")), "a copy of the keyring (old KEKs) outlived the rotation"
    assert assert_every_object_opens_with_one_key(client, state, owner, files) == {ring.active}
    assert verify_chain(state.db).ok
    assert_audit_verifies(home)
    print(f"seed {seed}: (s from the new KEK to the end, killed or finished, data keys) {outcomes}")
