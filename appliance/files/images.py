"""Image dataset intake (``purpose=fine-tune-images``): a zip of images with optional captions.

The archive is held in memory (a zip needs its central directory, at the end)
up to a size limit, and never written to disk as received. Every member is
checked against path traversal, links, zip bombs (total and per-member size,
compression ratio, member count) and decompression bombs (pixel count read
from the header before decoding). Images are decoded by Pillow and re-encoded
from pixels only, as PNG: EXIF, GPS, XMP, ICC profiles and text chunks are all
dropped. Captions (``<image>.txt`` beside an image, or ``metadata.jsonl``
with ``{"file_name", "text"}``) go through the same scanner and policy as
text datasets. What is stored (encrypted) is a new zip: ``images/NNNN.png``
and ``metadata.jsonl``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import stat
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidRequestError, PayloadTooLargeError
from appliance.files.pipeline import IntakeReport
from appliance.policy import Policy, decide, redact_text
from appliance.policy.surrogates import Surrogates
from appliance.scanning.findings import REPLACING_ACTIONS
from appliance.storage.blobs import BlobWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CAPTION_FIELD = "caption"


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image archive."""

    max_archive_bytes: int = 256 * 1024 * 1024
    max_members: int = 2000
    max_member_bytes: int = 64 * 1024 * 1024
    max_total_uncompressed: int = 1024 * 1024 * 1024
    max_compression_ratio: int = 100
    max_pixels: int = 40_000_000  # ~6300 x 6300
    min_images: int = 1


def _bad(message: str, member: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=f"file: {member}" if member else "file")


def _safe_name(info: zipfile.ZipInfo) -> str:
    """The member's normalised name, or an error if it is a link or escapes the archive."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _bad(f"archive member {name!r} is a symbolic link; links are not accepted", name)
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or ".." in raw.split("/"):
        raise _bad(f"archive member {name!r} points outside the archive (absolute path or '..')", name)
    return posixpath.normpath(raw)


class ImageArchiveIntake:
    """Push-based like :class:`~appliance.files.pipeline.JsonlIntake`: feed the upload, then close.

    Args:
        writer: Receives the sanitised archive (encrypted by it).
        scanner: The intake scanner, for captions.
        policy: The project's policy.
        limits: Archive bounds.
        instance_prompt: Optional prompt naming the subject (scanned like a caption).
    """

    def __init__(self, writer: BlobWriter, scanner: Any, policy: Policy, *, limits: ImageLimits | None = None,
                 instance_prompt: str | None = None, max_findings: int = 100_000) -> None:
        self.writer, self.scanner, self.policy = writer, scanner, policy
        self.surrogates = Surrogates(writer.derive_secret("surrogates"))
        self.limits = limits or ImageLimits()
        self.instance_prompt = instance_prompt
        self.max_findings = max_findings
        self._buffer = bytearray()
        self.report = IntakeReport()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self.report.original_bytes += len(data)
        if len(self._buffer) > self.limits.max_archive_bytes:
            raise PayloadTooLargeError(
                f"image archive is over the {self.limits.max_archive_bytes}-byte limit", param="file")

    def close(self) -> IntakeReport:
        try:
            archive = zipfile.ZipFile(io.BytesIO(bytes(self._buffer)))
        except zipfile.BadZipFile:
            raise _bad("the file is not a zip archive; upload a .zip of images (and optional captions)") from None
        try:
            return self._process(archive)
        finally:
            self._buffer[:] = b"\0" * len(self._buffer)
            self._buffer.clear()

    def _read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
        limits = self.limits
        if info.file_size > limits.max_member_bytes:
            raise _bad(f"archive member {name!r} is {info.file_size} bytes uncompressed; the limit is "
                       f"{limits.max_member_bytes}", name)
        if info.compress_size and info.file_size / max(info.compress_size, 1) > limits.max_compression_ratio:
            raise _bad(f"archive member {name!r} expands {info.file_size // max(info.compress_size, 1)}-fold; "
                       "this looks like a zip bomb", name)
        with archive.open(info) as fh:
            data = fh.read(limits.max_member_bytes + 1)  # never trust the declared size alone
        if len(data) > limits.max_member_bytes:
            raise _bad(f"archive member {name!r} is larger than it declares", name)
        return data

    def _image(self, data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > self.limits.max_pixels:
                    raise _bad(f"image {name!r} has {width}x{height} pixels; the limit is {self.limits.max_pixels} "
                               "(decompression bomb guard)", name)
                probe.verify()
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
                    converted = img.convert("RGBA" if alpha else "RGB")
                    # A new image from raw pixels carries none of the source's metadata.
                    clean = Image.frombytes(converted.mode, converted.size, converted.tobytes())
        except InvalidRequestError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as exc:
            raise _bad(f"archive member {name!r} is not a readable image ({type(exc).__name__})", name) from None
        out = io.BytesIO()
        clean.save(out, format="PNG", optimize=False)  # pixels only: no EXIF, GPS, XMP, ICC or text chunks
        return out.getvalue(), clean.size

    def _process(self, archive: zipfile.ZipFile) -> IntakeReport:
        limits, report = self.limits, self.report
        members = [i for i in archive.infolist() if not i.is_dir()]
        if len(members) > limits.max_members:
            raise _bad(f"the archive has {len(members)} entries; the limit is {limits.max_members}")
        if sum(i.file_size for i in members) > limits.max_total_uncompressed:
            raise _bad("the archive expands beyond the total size limit; this looks like a zip bomb")
        images: dict[str, bytes] = {}
        captions: dict[str, str] = {}
        for info in members:
            name = _safe_name(info)
            base = posixpath.basename(name)
            if base.startswith(".") or name.startswith("__MACOSX/"):
                continue  # resource forks and hidden files from archivers: ignored, not stored
            lower = name.lower()
            data = self._read(archive, info, name)
            if lower.endswith(IMAGE_SUFFIXES):
                images[name] = data
            elif lower.endswith(".txt"):
                captions[posixpath.splitext(name)[0]] = _text(data, name)
            elif base == "metadata.jsonl":
                for n, line in enumerate(_text(data, name).splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        entry = json.loads(line)
                        captions[posixpath.splitext(posixpath.join(posixpath.dirname(name),
                                                                   entry["file_name"]))[0]] = str(entry["text"])
                    except (ValueError, KeyError, TypeError, RecursionError):
                        raise InvalidRequestError(
                            f"{name} line {n} must be {{\"file_name\": ..., \"text\": ...}}",
                            param=f"file: {name} line {n}") from None
            else:
                raise _bad(f"archive member {name!r} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a "
                           "caption (.txt, metadata.jsonl)", name)
        if len(images) < limits.min_images:
            raise _bad("the archive holds no images")
        ordered = sorted(images)
        texts = [(i, CAPTION_FIELD, captions.get(posixpath.splitext(n)[0], "")) for i, n in enumerate(ordered)]
        if self.instance_prompt:
            texts.append((len(ordered), "instance_prompt", self.instance_prompt))
        found = self.scanner.scan([t for t in texts if t[2]], entities=self.policy.scanned_entities())
        text_of = {(i, field_): text for i, field_, text in texts}
        decision = decide(found, self.policy, lambda f: text_of[(f.record, f.field)])
        by_record: dict[int, list[Any]] = {}
        for f in decision.findings:
            report.by_type[f.entity_type] += 1
            report.by_action[f.action] += 1
            if f.action == "block":
                report.blocked_lines.setdefault(f.entity_type, []).append(f.record + 1)
            by_record.setdefault(f.record, []).append(f)
            if len(report.findings) < self.max_findings:
                report.findings.append(f)
        report.records = len(ordered)
        if report.blocked:
            return report
        out = io.BytesIO()
        sizes: Counter[str] = Counter()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
            meta = []
            for i, name in enumerate(ordered):
                png, size = self._image(images[name], name)
                sizes[f"{size[0]}x{size[1]}"] += 1
                stored = f"images/{i:04d}.png"
                z.writestr(zipfile.ZipInfo(stored, date_time=(1980, 1, 1, 0, 0, 0)), png)
                caption = texts[i][2]
                redactions = [f for f in by_record.get(i, []) if f.action in REPLACING_ACTIONS]
                if redactions:
                    caption = redact_text(caption, redactions, self.surrogates)
                    report.redacted_records += 1
                meta.append({"file_name": f"{i:04d}.png", "text": caption})
            prompt = self.instance_prompt
            if prompt:
                redactions = [f for f in by_record.get(len(ordered), []) if f.action in REPLACING_ACTIONS]
                prompt = redact_text(prompt, redactions, self.surrogates) if redactions else prompt
            z.writestr(zipfile.ZipInfo("images/metadata.jsonl", date_time=(1980, 1, 1, 0, 0, 0)),
                       "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in meta))
            z.writestr(zipfile.ZipInfo("dataset.json", date_time=(1980, 1, 1, 0, 0, 0)),
                       json.dumps({"instance_prompt": prompt, "images": len(ordered), "sizes": dict(sizes)}))
        data = out.getvalue()
        self.writer.write(data)
        report.stored_bytes = len(data)
        report.content_sha256 = hashlib.sha256(data).hexdigest()
        return report


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _bad(f"archive member {name!r} is not UTF-8 text", name) from None
