"""Importing a base model into the store, offline.

:func:`import_model` accepts a Hugging Face directory (config, safetensors
weights, tokenizer files) or a ``.gguf`` file, and writes a plain Hugging Face
directory that ``from_pretrained(dest_dir)`` loads. Nothing touches the
network (``local_files_only`` everywhere) and nothing is unpickled: ``.bin``
weights and custom modelling code are refused.

The returned :class:`ModelInfo` carries a content hash over the stored files
(:func:`hash_model_dir`) for lineage: a job records it, and the store can
re-hash later to prove the base model is the one that was imported.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from appliance.errors import ConflictError, InvalidRequestError
from appliance.modelstore.architectures import SUPPORTED_ARCHITECTURES

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Files copied from a Hugging Face directory; anything else (custom code,
#: pickled weights, README, hub metadata) stays behind.
_HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: ``general.architecture`` values in GGUF files that map onto a supported model type.
#: transformers' GGUF loader reads these (``gemma3`` as ``gemma3_text``).
_GGUF_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}


@dataclass(frozen=True)
class ModelInfo:
    """What the store knows about an imported base model.

    Attributes:
        name: The store name given at import.
        architecture: The transformers class, e.g. ``LlamaForCausalLM``.
        model_type: ``config.model_type``, e.g. ``llama``.
        parameter_count: Unique parameters (tied weights counted once).
        dtype: Dtype of the stored weights, e.g. ``float32``.
        has_chat_template: Whether the tokenizer has a chat template.
        context_length: ``max_position_embeddings`` from the config, if any.
        content_hash: ``sha256:<hex>`` over the stored files (see :func:`hash_model_dir`).
        source_format: ``hf`` for a directory, ``gguf`` for a GGUF file.
        source_hash: ``sha256:<hex>`` of the source: the GGUF file's plain digest (as
            ``sha256sum`` prints it), or for a directory the :func:`hash_model_dir`-style
            digest of the files copied from it.
        size_bytes: Total size of the stored files.
    """

    name: str
    architecture: str
    model_type: str
    parameter_count: int
    dtype: str
    has_chat_template: bool
    context_length: int | None
    content_hash: str
    source_format: Literal["hf", "gguf"]
    source_hash: str
    size_bytes: int
    #: the licence the source states (its model card's ``license:``, a GGUF's ``general.license``), if any
    license: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_model(src: Path, dest_dir: Path, name: str, *,
                 on_progress: Callable[[str], None] | None = None) -> ModelInfo:
    """Import a base model from a Hugging Face directory or a GGUF file.

    GGUF weights are dequantised (to float32) and saved as safetensors. The
    result is written to a staging directory beside ``dest_dir`` and renamed
    into place, so a failed import leaves nothing behind.

    Args:
        src: A Hugging Face model directory or a ``.gguf`` file.
        dest_dir: Where the model goes; must not exist or be empty.
        name: The store name, ``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 characters.
        on_progress: Called with a sentence at each stage and after each file copied
            (an import of a 70B model moves a few hundred GB).

    Returns:
        The imported model's :class:`ModelInfo`.

    Raises:
        InvalidRequestError: ``src`` is not a model, has an unsupported
            architecture, lacks a tokenizer, or ``name`` is malformed.
        ConflictError: ``dest_dir`` exists and is not empty.
    """
    src, dest_dir = Path(src), Path(dest_dir)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequestError(
            f"`name` must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit; got {name!r}",
            param="name",
        )
    if not src.exists():
        raise InvalidRequestError(f"`src` {src} does not exist", param="src")
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise ConflictError(f"`dest_dir` {dest_dir} already exists and is not empty; choose another", param="dest_dir")

    progress = on_progress or (lambda message: None)
    staging = dest_dir.parent / f".{dest_dir.name}.importing-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        if src.is_file():
            if src.suffix.lower() != ".gguf":
                raise InvalidRequestError(
                    f"`src` {src} is neither a model directory nor a .gguf file", param="src"
                )
            source_format: Literal["hf", "gguf"] = "gguf"
            progress(f"hashing {src.name} ({_gib(src.stat().st_size)})")
            source_hash = _sha256_file(src)
            progress("dequantising the GGUF weights to safetensors")
            _import_gguf(src, staging)
        else:
            source_format = "hf"
            copied = _import_hf_dir(src, staging, progress)
            progress("hashing the source files")
            source_hash = _hash_files(src, copied)
        progress("checking the weights cover the model and hashing the stored copy")
        info = _inspect(staging, name=name, source_format=source_format, source_hash=source_hash, src=src)
        info = replace(info, license=source_license(src))
        if dest_dir.exists():
            dest_dir.rmdir()
        staging.rename(dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def hash_model_dir(model_dir: Path) -> str:
    """Hash every regular file under ``model_dir`` in a stable order.

    The digest covers each file's relative POSIX path, size and bytes, files
    sorted by path, so renaming, adding or editing any file changes it.

    Returns:
        ``sha256:<hex>``.
    """
    model_dir = Path(model_dir)
    files = sorted((p for p in model_dir.rglob("*") if p.is_file()), key=lambda p: p.relative_to(model_dir).as_posix())
    return _hash_files(model_dir, files)


def _hash_files(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _import_gguf(src: Path, staging: Path) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        field = GGUFReader(src).fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as exc:  # the reader raises bare ValueErrors on garbage
        raise InvalidRequestError(f"`src` {src} is not a readable GGUF file: {exc}", param="src") from exc
    if arch not in _GGUF_ARCHITECTURES:
        raise InvalidRequestError(
            f"`src` {src} has GGUF architecture {arch!r}, which is not supported; "
            f"supported: {', '.join(sorted(_GGUF_ARCHITECTURES))}",
            param="src",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
    except Exception as exc:
        raise InvalidRequestError(f"`src` {src} has no usable tokenizer: {exc}", param="src") from exc
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, local_files_only=True, dtype=torch.float32
    )
    # The weights are already dequantised; without this, save_pretrained
    # refuses ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


_LICENSE_RE = re.compile(r"^license(?:_name)?:\s*['\"]?([A-Za-z0-9][A-Za-z0-9 ._+-]{0,63}?)['\"]?\s*$")


def source_license(src: Path) -> str | None:
    """The licence a model's source states: ``license:`` in its model card's front matter (``license_name:``
    where that is ``other``), or a GGUF file's ``general.license``. ``None`` when it states none; never guessed."""
    try:
        if src.is_file():
            from gguf import GGUFReader

            field = GGUFReader(src).fields.get("general.license")
            value = field.contents() if field is not None else None
            match = _LICENSE_RE.match(f"license: {value}") if isinstance(value, str) else None
            return match.group(1) if match else None
        card = src / "README.md"
        if not card.is_file():
            return None
        lines = card.read_text(encoding="utf-8", errors="replace")[:20_000].splitlines()
    except Exception:  # a licence is information, never a reason to fail an import
        return None
    if not lines or lines[0].strip() != "---":
        return None
    found: dict[str, str] = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        match = _LICENSE_RE.match(line.strip())
        if match:
            found["name" if line.strip().startswith("license_name") else "license"] = match.group(1)
    if found.get("license") == "other" and "name" in found:
        return found["name"]
    return found.get("license")


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _import_hf_dir(src: Path, staging: Path, progress: Callable[[str], None]) -> list[Path]:
    if not (src / "config.json").is_file():
        raise InvalidRequestError(f"`src` {src} is not a model directory: it has no config.json", param="src")
    weights = _weight_files(src, src)
    if not weights:
        pickled = [p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        hint = (
            f" ({', '.join(pickled)} are pickle files, which the appliance never loads; convert them to safetensors)"
            if pickled
            else ""
        )
        raise InvalidRequestError(f"`src` {src} has no .safetensors weights{hint}", param="src")
    if not any((src / f).is_file() for f in _TOKENIZER_FILES):
        raise InvalidRequestError(
            f"`src` {src} has no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})", param="src"
        )
    _check_model_type(_load_config(src), src)

    copied = [src / f for f in _HF_FILES if (src / f).is_file()] + weights
    total = sum(p.stat().st_size for p in copied)
    progress(f"copying {len(copied)} files ({_gib(total)})")
    done = 0
    for i, path in enumerate(copied, 1):
        shutil.copyfile(path, staging / path.name)  # follows hub-cache symlinks to the blobs
        done += path.stat().st_size
        if path in weights:
            progress(f"copied {path.name} ({i}/{len(copied)} files, {_gib(done)} of {_gib(total)})")
    return copied


def _weight_files(model_dir: Path, src: Path) -> list[Path]:
    """The safetensors files that hold the model's weights, as transformers would load them.

    With ``model.safetensors.index.json``, exactly the shards its ``weight_map``
    names (each must exist). Without one, every ``*.safetensors`` file, except
    that Mistral's ``consolidated*.safetensors`` (the same weights under other
    names, shipped beside the Hugging Face ones) is left out when any other
    weights are there.

    Raises:
        InvalidRequestError: The index is malformed or names a shard that is absent.
    """
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        weights = sorted(model_dir.glob("*.safetensors"))
        hf_named = [p for p in weights if not p.name.startswith("consolidated")]
        return hf_named or weights
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequestError(
            f"`src` {src}: {index.name} is not a safetensors index with a `weight_map`: {exc!r}", param="src"
        ) from exc
    for shard in shards:
        # A shard is a file beside the index, never a path that leaves the directory.
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise InvalidRequestError(
                f"`src` {src}: {index.name} names {shard!r} as a shard; shards are .safetensors files "
                "in the model directory",
                param="src",
            )
        if not (model_dir / shard).is_file():
            raise InvalidRequestError(
                f"`src` {src}: {index.name} names the shard {shard}, which is missing", param="src"
            )
    return [model_dir / shard for shard in shards]


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise InvalidRequestError(f"`src` {model_dir}: config.json cannot be read: {exc}", param="src") from exc


def _check_model_type(config: Any, src: Path) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise InvalidRequestError(
            f"`src` {src} has architecture {model_type!r}, which is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}",
            param="src",
        )


def _inspect(
    model_dir: Path, *, name: str, source_format: Literal["hf", "gguf"], source_hash: str, src: Path
) -> ModelInfo:
    """Check the staged directory is a loadable model and describe it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _load_config(model_dir)
    _check_model_type(config, src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise InvalidRequestError(f"`src` {src}: the tokenizer cannot be loaded: {exc}", param="src") from exc

    stored: dict[str, str] = {}
    for path in _weight_files(model_dir, src):
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                stored[key] = fh.get_slice(key).get_dtype()
    # Build the model on the meta device: no memory, but the exact parameter
    # names and the tied-weight layout, to check the weights cover it.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {n for n, _ in skeleton.named_parameters()}  # tied weights appear once
    missing = sorted(expected - set(stored))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InvalidRequestError(f"`src` {src}: the weights lack {shown}", param="src")

    dtype_name = Counter(stored.values()).most_common(1)[0][0]
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    return ModelInfo(
        name=name,
        architecture=(config.architectures or [type(skeleton).__name__])[0],
        model_type=config.model_type,
        parameter_count=skeleton.num_parameters(),
        dtype=_SAFETENSORS_DTYPES.get(dtype_name, dtype_name.lower()),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        context_length=getattr(config, "max_position_embeddings", None),
        content_hash=hash_model_dir(model_dir),
        source_format=source_format,
        source_hash=source_hash,
        size_bytes=sum(p.stat().st_size for p in files),
    )


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
