"""How an image evaluation's stored images are sent in its page: small ones as stored, large ones as previews."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from appliance.portal.evaluations_page import THUMBNAIL, _shown

pytestmark = pytest.mark.no_database


def png(size: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (size, size // 2), (200, 30, 30)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_small_images_are_sent_as_stored_and_large_ones_as_jpeg_previews():
    small = png(16)
    assert _shown(small) == "data:image/png;base64," + small
    large = _shown(png(THUMBNAIL * 2))
    assert large.startswith("data:image/jpeg;base64,")
    preview = Image.open(io.BytesIO(base64.b64decode(large.split(",", 1)[1])))
    assert preview.format == "JPEG" and preview.size == (THUMBNAIL, THUMBNAIL // 2)


@pytest.mark.parametrize("stored", ["not base64!", base64.b64encode(b"not an image").decode(), None])
def test_an_unreadable_image_is_left_out_rather_than_failing_the_page(stored):
    assert _shown(stored) is None
