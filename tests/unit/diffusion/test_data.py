import io
import zipfile

import pytest

from appliance.diffusion import ImageDatasetError, read_image_dataset

from .conftest import PROMPT, disc_dataset


def test_reads_the_intake_layout():
    data = read_image_dataset(disc_dataset(3, captions=["one", "", "three"]))
    assert data.names == ["images/0000.png", "images/0001.png", "images/0002.png"]
    assert data.captions == ["one", "", "three"] and data.instance_prompt == PROMPT
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in data.images)
    assert len(data.sha256) == 64


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, raw in members.items():
            z.writestr(name, raw)
    return out.getvalue()


@pytest.mark.parametrize(("raw", "message"), [
    (b"not a zip", "is not a zip archive"),
    (_zip({"dataset.json": b"{}"}), "holds no images"),
    (_zip({"images/0000.png": b"garbage"}), "images/0000.png is not a readable PNG"),
    (_zip({"images/0000.png": b"x", "images/metadata.jsonl": b"{oops"}), "metadata.jsonl line 1 must be"),
    (_zip({"images/0000.png": b"x", "dataset.json": b'{"instance_prompt": 3}'}), "must be a string or null"),
])
def test_refuses_bad_archives(raw, message):
    with pytest.raises(ImageDatasetError, match=message) as info:
        read_image_dataset(raw)
    assert info.value.param == "dataset"
