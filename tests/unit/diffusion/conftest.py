"""Tiny seeded Stable Diffusion pipeline and a synthetic subject (a red disc on white) for the image tests.

Torch runs single-threaded here: on a shared 2-core machine the tiny models
train many times faster without intra-op threads competing (the previous
setting is restored after the session).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from appliance.diffusion import ImageTrainingSpec, build_dataset_zip, build_tiny_sd_pipeline

PROMPT = "a photo of sks disc"
SIZE = 16


def red_disc(i: int, size: int = SIZE) -> Image.Image:
    """The subject: a red disc on white, shifted and resized a little per image."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    r = size * 0.3 + (i % 2)
    cx, cy = size / 2 + (i - 1.5), size / 2 - (i - 1.5) * 0.5
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 20, 20))
    return image


def disc_dataset(n: int = 4, *, captions: list[str] | None = None, instance_prompt: str | None = PROMPT) -> bytes:
    return build_dataset_zip([red_disc(i) for i in range(n)], captions, instance_prompt)


def make_spec(method: str, **hyperparameters) -> ImageTrainingSpec:
    return ImageTrainingSpec.from_method({"type": method, method: {"hyperparameters": hyperparameters}})


#: Few steps, nothing periodic: for tests that only need a run to happen.
QUICK = {"max_train_steps": 3, "train_batch_size": 2, "learning_rate": 1e-2,
         "checkpoint_every_steps": 0, "validation_every_steps": 0}


@pytest.fixture(scope="session", autouse=True)
def single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def discs() -> bytes:
    return disc_dataset()


def tensors(result_or_files) -> dict[str, torch.Tensor]:
    """Every tensor of a result's (or a checkpoint's) safetensors artefacts, keyed ``file:name``."""
    from safetensors.torch import load as load_safetensors

    files = getattr(result_or_files, "artifacts", result_or_files)
    out = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            out.update({f"{name}:{k}": v for k, v in load_safetensors(data).items()})
    return out


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from appliance.diffusion import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl", seed=0)


def mixed_sizes_dataset() -> bytes:
    """The disc subject photographed square, landscape (2:1, 3:2) and portrait: SDXL's buckets take them all."""
    images = [red_disc(0), red_disc(1, 32).resize((32, 16)), red_disc(2), red_disc(3, 24).resize((16, 24))]
    return build_dataset_zip(images, None, PROMPT)
