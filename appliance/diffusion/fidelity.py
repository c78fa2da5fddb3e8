"""Subject fidelity as a documented pixel-statistics proxy, and image grids.

CLIP-I and DINO scores need image-encoder weights that are not installed on
the appliance, so fidelity is measured with colour statistics instead, and
every metric name says ``proxy``:

* colour-histogram score: each image's joint RGB histogram (4 bins per channel,
  64 in all, normalised) is intersected (sum of bin-wise minima) with the mean
  histogram of the instance images; the mean over generations, in [0, 1],
  higher is closer.
* mean colour distance: the Euclidean distance between the mean RGB colour of
  the generations and of the instance images, divided by its maximum
  (255 * sqrt(3)), in [0, 1], lower is closer.

Both see colour, not shape or identity: good enough to tell "learnt the
subject's colours" from "did not", as a sanity check rather than a quality score.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

BINS = 4


def color_histogram(image) -> np.ndarray:
    """Normalised joint RGB histogram with ``BINS`` bins per channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).reshape(-1, 3).astype(np.int64)
    q = pixels * BINS // 256
    counts = np.bincount(q[:, 0] * BINS * BINS + q[:, 1] * BINS + q[:, 2], minlength=BINS**3).astype(np.float64)
    return counts / counts.sum()


def fidelity_proxy(generated: Sequence, references: Sequence) -> dict[str, float]:
    """``{"color_histogram": ..., "mean_color_distance": ...}`` of ``generated`` against ``references``."""
    reference = np.mean([color_histogram(im) for im in references], axis=0)
    scores = [float(np.minimum(color_histogram(im), reference).sum()) for im in generated]
    mean_ref = np.mean([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) for im in references], 0)
    mean_gen = np.mean([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) for im in generated], 0)
    return {
        "color_histogram": float(np.mean(scores)),
        "mean_color_distance": float(np.linalg.norm(mean_gen - mean_ref) / (255 * math.sqrt(3))),
    }


def grid_png(rows: Sequence[Sequence], *, tile: int | None = None, min_tile: int = 64) -> bytes:
    """A PNG of images in rows (empty rows are left blank), tiles resized to one square size.

    Tiles smaller than ``min_tile`` pixels are enlarged with nearest-neighbour
    sampling so tiny test images stay visible.
    """
    from PIL import Image

    all_images = [im for row in rows for im in row]
    size = tile or max(min_tile, max((max(im.size) for im in all_images), default=min_tile))
    columns = max((len(row) for row in rows), default=1) or 1
    canvas = Image.new("RGB", (columns * size, max(1, len(rows)) * size), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            resample = Image.NEAREST if max(im.size) < size else Image.BILINEAR
            canvas.paste(im.convert("RGB").resize((size, size), resample), (c * size, r * size))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
