"""The sanitised image dataset (a zip from intake) read into memory.

Layout, as :mod:`appliance.files.images` stores it: ``images/NNNN.png``,
``images/metadata.jsonl`` (``{"file_name": "0000.png", "text": caption}`` per
line) and ``dataset.json`` (``{"instance_prompt": str | null, ...}``). Nothing is
written to disk. The archive was checked at intake; this reader still refuses
anything unexpected rather than trusting it.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import zipfile
from dataclasses import dataclass

from appliance.errors import InvalidRequestError

MAX_IMAGES = 2000
MAX_PIXELS = 40_000_000


class ImageDatasetError(InvalidRequestError):
    """The dataset archive cannot be used for training."""

    code = "invalid_training_data"


@dataclass(frozen=True)
class ImageDataset:
    """Decoded training images with their captions.

    Attributes:
        images: RGB ``PIL.Image`` objects, in file-name order.
        names: Their member names (``images/0000.png``, ...).
        captions: One per image; ``""`` where none was given.
        instance_prompt: ``dataset.json``'s prompt, if any.
        sha256: Digest of the archive bytes (a checkpoint resumes only on the same data).
    """

    images: list
    names: list[str]
    captions: list[str]
    instance_prompt: str | None
    sha256: str


def read_image_dataset(data: bytes, *, param: str = "dataset") -> ImageDataset:
    """Parse the sanitised dataset zip.

    Raises:
        ImageDatasetError: Not a zip, no images, an undecodable image or malformed metadata.
    """
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDatasetError(f"`{param}` must be the dataset archive's bytes; got {type(data).__name__}", param=param)
    data = bytes(data)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ImageDatasetError(f"`{param}` is not a zip archive: {exc}", param=param) from None
    with archive:
        names = sorted(
            n for n in archive.namelist()
            if n.startswith("images/") and n.lower().endswith(".png") and posixpath.dirname(n) == "images"
        )
        if not names:
            raise ImageDatasetError(f"`{param}` holds no images/NNNN.png members", param=param)
        if len(names) > MAX_IMAGES:
            raise ImageDatasetError(f"`{param}` holds {len(names)} images; the limit is {MAX_IMAGES}", param=param)
        captions_by_file: dict[str, str] = {}
        if "images/metadata.jsonl" in archive.namelist():
            text = _text(archive.read("images/metadata.jsonl"), "images/metadata.jsonl", param)
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    captions_by_file[str(entry["file_name"])] = str(entry.get("text") or "")
                except (ValueError, KeyError, TypeError):
                    raise ImageDatasetError(
                        f"`{param}`: images/metadata.jsonl line {n} must be {{\"file_name\": ..., \"text\": ...}}",
                        param=param,
                    ) from None
        instance_prompt = None
        if "dataset.json" in archive.namelist():
            try:
                meta = json.loads(_text(archive.read("dataset.json"), "dataset.json", param))
            except ValueError:
                raise ImageDatasetError(f"`{param}`: dataset.json is not valid JSON", param=param) from None
            prompt = meta.get("instance_prompt") if isinstance(meta, dict) else None
            if prompt is not None and not isinstance(prompt, str):
                raise ImageDatasetError(f"`{param}`: dataset.json `instance_prompt` must be a string or null; "
                                        f"got {type(prompt).__name__}", param=param)
            instance_prompt = prompt.strip() or None if prompt else None
        images = []
        for name in names:
            try:
                with Image.open(io.BytesIO(archive.read(name))) as img:
                    if img.width * img.height > MAX_PIXELS:
                        raise ImageDatasetError(f"`{param}`: {name} has {img.width}x{img.height} pixels, over the "
                                                f"limit of {MAX_PIXELS}", param=param)
                    images.append(img.convert("RGB"))
            except ImageDatasetError:
                raise
            except Exception as exc:  # Pillow raises many types on bad data
                raise ImageDatasetError(f"`{param}`: {name} is not a readable PNG: {exc}", param=param) from None
    captions = [captions_by_file.get(posixpath.basename(n), "") for n in names]
    return ImageDataset(images=images, names=names, captions=captions, instance_prompt=instance_prompt,
                        sha256=hashlib.sha256(data).hexdigest())


def build_dataset_zip(images: list, captions: list[str] | None = None, instance_prompt: str | None = None) -> bytes:
    """The archive layout intake produces, from PIL images (for tests, the benchmark and demos)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        meta = []
        for i, image in enumerate(images):
            png = io.BytesIO()
            image.convert("RGB").save(png, format="PNG")
            z.writestr(zipfile.ZipInfo(f"images/{i:04d}.png", date_time=(1980, 1, 1, 0, 0, 0)), png.getvalue())
            meta.append({"file_name": f"{i:04d}.png", "text": (captions[i] if captions else "")})
        z.writestr(zipfile.ZipInfo("images/metadata.jsonl", date_time=(1980, 1, 1, 0, 0, 0)),
                   "".join(json.dumps(m) + "\n" for m in meta))
        z.writestr(zipfile.ZipInfo("dataset.json", date_time=(1980, 1, 1, 0, 0, 0)),
                   json.dumps({"instance_prompt": instance_prompt, "images": len(images)}))
    return out.getvalue()


def _text(raw: bytes, name: str, param: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImageDatasetError(f"`{param}`: {name} is not UTF-8 text", param=param) from None
