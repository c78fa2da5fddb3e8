from __future__ import annotations

import pytest

from appliance.crypto.envelope import FileKeyProvider, KeyUnavailableError, new_data_key
from appliance.crypto.keyfile import create_keyring
from appliance.crypto.stream import IntegrityError


def test_wrap_unwrap_and_context_binding(tmp_path):
    create_keyring(tmp_path / "k")
    keys = FileKeyProvider(tmp_path / "k")
    dk = new_data_key()
    wrapped = keys.wrap(dk, "file-1|acme")
    assert wrapped.kek_id == keys.active_kek_id() and dk not in wrapped.blob
    assert keys.unwrap(wrapped, "file-1|acme") == dk
    with pytest.raises(IntegrityError):
        keys.unwrap(wrapped, "file-2|acme")


def test_rotation_helpers_keep_then_drop_old_keks(tmp_path):
    create_keyring(tmp_path / "k")
    keys = FileKeyProvider(tmp_path / "k")
    old = keys.active_kek_id()
    wrapped = keys.wrap(new_data_key(), "x")
    new = keys.add_active_kek()
    assert keys.active_kek_id() == new and FileKeyProvider(tmp_path / "k").kek_ids() == sorted([old, new])
    keys.unwrap(wrapped, "x")  # old KEK still usable until retired
    # What a rotation killed while saving the key file leaves: a copy holding the old KEK.
    stale = tmp_path / ".k.0badc0de.tmp"
    stale.write_bytes((tmp_path / "k").read_bytes())
    assert keys.retire_all_but_active() == [old]
    with pytest.raises(KeyUnavailableError, match=old):
        FileKeyProvider(tmp_path / "k").unwrap(wrapped, "x")
    assert not stale.exists()  # no copy of a retired KEK stays on disk
