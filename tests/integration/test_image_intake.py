"""Image datasets: zip safety, decompression bombs, metadata stripping, caption scanning."""

from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from appliance.identity.roles import Role
from tests.conftest import bearer


@pytest.fixture
def owner(make_token) -> str:
    return make_token("olivia", Role.DATA_OWNER, "acme")


def png(color: str = "red", size: tuple[int, int] = (48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_with_gps() -> bytes:
    img = Image.new("RGB", (48, 48), "blue")
    exif = img.getexif()
    exif[0x010F] = "SpyCam"
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (51.0, 30.0, 12.0), 3: "W", 4: (0.0, 7.0, 39.0)})
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def upload(client, token: str, data: bytes, **fields):
    return client.post("/v1/files", headers=bearer(token), data={"purpose": "fine-tune-images", **fields},
                       files={"file": ("images.zip", data, "application/zip")})


def stored_archive(client, token: str, file_id: str) -> zipfile.ZipFile:
    content = client.get(f"/v1/files/{file_id}/content", headers=bearer(token)).content
    return zipfile.ZipFile(io.BytesIO(content))


def test_images_are_re_encoded_without_metadata_and_captions_scanned(client, owner):
    data = make_zip({
        "subject/a.png": png("red"), "subject/a.txt": b"a red disc on white",
        "subject/b.jpg": jpeg_with_gps(), "subject/b.txt": b"photo sent by jane.doe@example.com",
        "subject/c.png": png("green"),
    })
    resp = upload(client, owner, data, instance_prompt="a photo of sks disc")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["purpose"] == "fine-tune-images" and body["scan"]["records"] == 3
    archive = stored_archive(client, owner, body["id"])
    names = sorted(archive.namelist())
    assert names == ["dataset.json", "images/0000.png", "images/0001.png", "images/0002.png", "images/metadata.jsonl"]
    for name in names:
        if name.endswith(".png"):
            img = Image.open(io.BytesIO(archive.read(name)))
            assert img.format == "PNG" and not img.getexif() and "exif" not in img.info
            assert not any(k in img.info for k in ("icc_profile", "xmp", "XML:com.adobe.xmp"))
    raw = b"".join(archive.read(n) for n in names)
    assert b"SpyCam" not in raw and b"jane.doe@example.com" not in raw
    captions = archive.read("images/metadata.jsonl").decode()
    assert "<EMAIL_ADDRESS>" in captions and "a red disc on white" in captions
    report = client.get(f"/v1/files/{body['id']}/scan", headers=bearer(owner)).json()
    assert [(f["record"], f["field"], f["entity_type"]) for f in report["findings"]] == [(1, "caption", "EMAIL_ADDRESS")]


@pytest.mark.parametrize(
    ("members", "fragment"),
    [
        ({"../evil.png": png()}, "outside the archive"),
        ({"/etc/evil.png": png()}, "outside the archive"),
        ({"ok.png": png(), "notes.png": b"this is not an image at all"}, "not a readable image"),
        ({"ok.png": png(), "script.sh": b"#!/bin/sh"}, "neither an image"),
        ({"big.png": png("white", (9000, 9000))}, "decompression bomb"),
        ({"captions.txt": b"no images here"}, "no images"),
    ],
)
def test_hostile_or_invalid_archives_are_rejected(client, state, owner, members, fragment):
    resp = upload(client, owner, make_zip(members, zipfile.ZIP_STORED))  # stored: only the image itself expands
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"]["message"]
    assert client.get("/v1/files", headers=bearer(owner)).json()["data"] == []
    assert not [p for p in state.settings.blobs_dir.rglob("*") if p.is_file()]


def test_zip_bomb_and_non_zip_are_rejected(client, owner):
    bomb = make_zip({"ok.png": png(), "zeros.png": b"\0" * (20 * 1024 * 1024)})
    resp = upload(client, owner, bomb)
    assert resp.status_code == 400 and "zip bomb" in resp.json()["error"]["message"]
    resp = upload(client, owner, b"plain text, not a zip")
    assert resp.status_code == 400 and "not a zip" in resp.json()["error"]["message"]


def test_blocked_entity_in_a_caption_rejects_the_archive(client, owner):
    resp = upload(client, owner, make_zip({"a.png": png(), "a.txt": b"aws key AKIAIOSFODNN7EXAMPLE"}))
    assert resp.status_code == 422 and "AWS_ACCESS_KEY_ID" in resp.json()["error"]["message"]
