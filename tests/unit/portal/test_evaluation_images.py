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


def test_images_are_kept_as_png_up_to_512_px_and_as_jpeg_above_and_both_are_shown():
    """The result file of an SDXL evaluation (1024 px) holds JPEGs: a fraction of the PNGs' size."""
    from appliance.evaluations.image_task import KEPT_PNG_SIDE, kept_image

    small, large = (base64.b64decode(png(size)) for size in (KEPT_PNG_SIDE, KEPT_PNG_SIDE * 2))
    assert kept_image(small) == small
    kept = kept_image(large)
    assert Image.open(io.BytesIO(kept)).format == "JPEG" and Image.open(io.BytesIO(kept)).size == (1024, 512)
    assert _shown(base64.b64encode(kept).decode()).startswith("data:image/jpeg;base64,")
    out = io.BytesIO()
    Image.new("RGB", (16, 8)).save(out, format="JPEG")
    tiny_jpeg = base64.b64encode(out.getvalue()).decode()
    assert _shown(tiny_jpeg) == "data:image/jpeg;base64," + tiny_jpeg  # as stored, with its own type
