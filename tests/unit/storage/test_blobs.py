"""The blob store and key rotation against a real SQLite database and key file."""

from __future__ import annotations

import os
import shutil

import pytest

from appliance.audit.service import AuditContext
from appliance.crypto.envelope import FileKeyProvider, KeyUnavailableError
from appliance.crypto.keyfile import create_keyring
from appliance.crypto.stream import HEADER, SEGMENT_SIZE, TAG_SIZE, IntegrityError
from appliance.db.base import Database
from appliance.migrations import upgrade_to_head
from appliance.errors import NotFoundError
from appliance.storage.blobs import BlobStore
from appliance.storage.models import DataKey
from appliance.storage.rotation import rotate_keys

CTX = AuditContext(actor="test", auth_method="test")


@pytest.fixture
def env(tmp_path):
    create_keyring(tmp_path / "keys" / "master.key")
    from tests.conftest import database_url_for

    db = Database(database_url_for(tmp_path / "db") or f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade_to_head(db)
    keys = FileKeyProvider(tmp_path / "keys" / "master.key")
    yield db, BlobStore(tmp_path / "blobs", keys), keys, tmp_path
    db.dispose()


def put(db, store, object_id: str, data: bytes, project: str = "acme") -> None:
    with store.writing(object_id, project, "file") as w:
        for i in range(0, len(data), 10_000):
            w.write(data[i:i + 10_000])
        row = w.finish()
    with db.transaction() as s:
        s.add(row)


def get(db, store, object_id: str) -> bytes:
    with db.read() as s:
        return b"".join(store.read(s, object_id))


def test_round_trip_and_no_plaintext_on_disk(env):
    db, store, _, root = env
    data = b"planted-value-7f3a " * 20_000
    put(db, store, "file-1", data)
    assert get(db, store, "file-1") == data
    for path in root.rglob("*"):
        if path.is_file():
            assert b"planted-value-7f3a" not in path.read_bytes(), path


def _segments_at(path):
    blob = path.read_bytes()
    return blob, HEADER.size, SEGMENT_SIZE + TAG_SIZE


def test_byte_flip_segment_swap_and_truncation_fail_loudly(env):
    db, store, _, _ = env
    data = os.urandom(3 * SEGMENT_SIZE + 100)
    for name, tamper in {
        "flip": lambda b, h, s: b[:h + 10] + bytes([b[h + 10] ^ 1]) + b[h + 11:],
        "swap": lambda b, h, s: b[:h] + b[h + s:h + 2 * s] + b[h:h + s] + b[h + 2 * s:],
        "truncate": lambda b, h, s: b[:h + 2 * s],
    }.items():
        put(db, store, f"file-{name}", data)
        path = store.path_of(f"file-{name}")
        blob, h, s = _segments_at(path)
        path.write_bytes(tamper(blob, h, s))
        with pytest.raises(IntegrityError):
            get(db, store, f"file-{name}")


def test_aborted_write_leaves_no_file(env):
    db, store, _, root = env
    with pytest.raises(RuntimeError):
        with store.writing("file-x", "acme", "file") as w:
            w.write(b"partial upload")
            raise RuntimeError("client went away")
    assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []


def test_rotation_rewraps_every_key_and_the_old_key_file_opens_nothing(env):
    db, store, keys, root = env
    put(db, store, "file-a", b"alpha" * 1000)
    put(db, store, "file-b", b"beta" * 1000, project="globex")
    old_copy = root / "old.key"
    shutil.copy(root / "keys" / "master.key", old_copy)
    old_kek = keys.active_kek_id()
    result = rotate_keys(db, keys, CTX)
    assert result.rewrapped == 2 and result.retired_kek_ids == [old_kek]
    # Data still reads, with a provider that loads only the new key file.
    fresh = BlobStore(root / "blobs", FileKeyProvider(root / "keys" / "master.key"))
    assert get(db, fresh, "file-a") == b"alpha" * 1000
    assert get(db, fresh, "file-b") == b"beta" * 1000
    with db.read() as s:
        assert {r.kek_id for r in s.query(DataKey)} == {result.new_kek_id}
    # The old key file opens nothing any more.
    old_copy.chmod(0o600)
    stale = BlobStore(root / "blobs", FileKeyProvider(old_copy))
    for object_id in ("file-a", "file-b"):
        with pytest.raises(KeyUnavailableError):
            get(db, stale, object_id)


def test_shredded_object_is_unrecoverable_even_with_the_master_key(env):
    db, store, keys, root = env
    put(db, store, "file-s", b"shred me" * 100)
    ciphertext = store.path_of("file-s").read_bytes()
    with db.transaction() as s:
        evidence = store.shred(s, "file-s")
    store.remove("file-s")
    assert evidence.kek_id == keys.active_kek_id() and not store.path_of("file-s").exists()
    with db.read() as s:
        row = s.get(DataKey, "file-s")
        assert row.wrapped is None and row.shredded_at is not None
    with pytest.raises(NotFoundError):
        get(db, store, "file-s")
    # Even with the ciphertext restored from a backup, no key opens it: the
    # data key existed only wrapped in the row just destroyed.
    store.path_of("file-s").write_bytes(ciphertext)
    with pytest.raises(NotFoundError):
        get(db, store, "file-s")


def test_interrupted_writes_are_swept_and_live_ones_kept(env):
    db, store, _, root = env
    live = store.create("file-l", "acme", "file")
    live.write(b"y" * 100_000)
    dead = store.create("file-t", "acme", "file")
    dead.write(b"x" * 100_000)
    dead._fh.close()  # noqa: SLF001 - what the kernel does to the files of a killed process
    # A replica that starts while another one writes sweeps only the leftover of the dead writer.
    assert store.sweep_temporaries() == 1
    assert [p.name.split(".")[1] for p in (root / "blobs").rglob(".tmp-*")] == ["tmp-file-l"]
    row = live.finish()
    with db.transaction() as s:
        s.add(row)
    assert get(db, store, "file-l") == b"y" * 100_000
    assert not any(p.name.startswith(".tmp-") for p in (root / "blobs").rglob("*"))
