"""The adapter archive written member by member equals tarfile's, and refuses what it cannot stand behind."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from appliance.catalog.archive import AdapterArchive, pack_files, unpack_files


def _tarfile_pack(files: dict[str, bytes]) -> bytes:
    """What the catalogue packed before archives were streamed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o600, 0
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


@pytest.mark.parametrize("files", [
    {},
    {"adapter_config.json": b"{}", "adapter_model.safetensors": os.urandom(70_000)},
    {"unet/diffusion_pytorch_model.safetensors": os.urandom(512), "é-name.txt": b"", "x" * 150: b"long name"},
])
def test_a_streamed_archive_is_byte_identical_to_tarfiles(files):
    buf = io.BytesIO()
    archive = AdapterArchive(buf)
    for name in sorted(files):
        archive.begin(name, len(files[name]))
        for i in range(0, len(files[name]), 1000):  # the content arrives in chunks
            archive.write(files[name][i:i + 1000])
        archive.end()
    archive.close()
    assert buf.getvalue() == _tarfile_pack(files) == pack_files(files)
    assert unpack_files(buf.getvalue()) == files and archive.sizes == {n: len(b) for n, b in files.items()}


@pytest.mark.parametrize("size", [5 << 30, 9 << 30])  # past 4 GiB, and past ustar's 8 GiB (a PAX size record)
def test_a_member_over_4_gib_is_declared_with_its_exact_size(size):
    archive = AdapterArchive(io.BytesIO())
    archive.begin("adapter_model.safetensors", size)
    with tarfile.open(fileobj=io.BytesIO(archive.sink.getvalue()), mode="r:") as tar:
        member = tar.next()
    assert member.name == "adapter_model.safetensors" and member.size == size


@pytest.mark.parametrize(("steps", "match"), [
    ([("begin", "../x", 1)], "not a safe relative path"),
    ([("begin", ".hidden", 1)], "not a safe relative path"),
    ([("begin", "b", 0), ("end",), ("begin", "a", 0)], "must come in name order"),
    ([("begin", "a", None)], "needs its size in bytes"),
    ([("begin", "a", 2), ("write", b"abc")], "overran its size of 2 bytes"),
    ([("begin", "a", 2), ("write", b"a"), ("end",)], "ended after 1 of its 2 bytes"),
])
def test_a_malformed_member_is_refused(steps, match):
    archive = AdapterArchive(io.BytesIO())
    with pytest.raises(ValueError, match=match):
        for op, *args in steps:
            getattr(archive, op)(*args)
