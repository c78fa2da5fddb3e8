"""Importing a single-file Stable Diffusion checkpoint (``.safetensors``), offline.

The files people download and pass around (``v1-5-pruned-emaonly.safetensors``,
``sd_xl_base_1.0.safetensors``, their fine-tunes) hold the original (LDM) layout's
weights in one file. :func:`import_single_file`:

1. reads only the safetensors header (names, shapes, dtypes: no weights) and
   refuses anything that is not a Stable Diffusion checkpoint, naming what was
   expected; pickled ``.ckpt``/``.pt`` files are never opened;
2. tells SD 1.x, 2.x and SDXL base apart as diffusers does
   (``infer_diffusers_model_type``) and writes that family's pipeline configs and
   tokenizers from :mod:`appliance.diffusion.single_file_configs` (shipped, never fetched);
3. converts with diffusers' ``from_single_file(config=<those configs>, local_files_only=True)``
   in the checkpoint's own dtype, saves the pipeline in diffusers' layout to a staging
   directory beside the store, and imports that with
   :func:`appliance.diffusion.importer.import_diffusers_model`, so every check of a
   folder import (weights against configs, allowed classes, content hash) applies.

Nothing is left behind on failure. SD 2.x-base checkpoints (512 px, epsilon) cannot be
told from SD 2.1-768 (v-prediction) by their weights; diffusers maps both to 2.1's
configs and so does this module: import a 2.x-base model as a diffusers folder instead.
"""

from __future__ import annotations

import json
import shutil
import struct
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from appliance.diffusion.importer import _PICKLE_SUFFIXES, DiffusionModelInfo, import_diffusers_model
from appliance.diffusion.single_file_configs import CONFIGS, DESCRIPTIONS, write_pipeline_configs
from appliance.errors import InvalidRequestError

#: Every SD checkpoint holds its UNet under this prefix.
UNET_PREFIX = "model.diffusion_model."
EXPECTED = ("a single-file Stable Diffusion 1.x, 2.x or SDXL base checkpoint (.safetensors), or a diffusers "
            "pipeline folder (with model_index.json)")
_MAX_HEADER = 100 << 20
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class _Shape:
    """A header entry standing in for a tensor where only ``.shape`` is read."""

    def __init__(self, shape: list[int]) -> None:
        import torch

        self.shape = torch.Size(shape)


def read_header(path: Path, param: str = "source") -> dict[str, dict]:
    """The safetensors header of ``path`` (``{name: {"dtype", "shape", "data_offsets"}}``), or a 400 naming it."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if length is None or not 2 <= length <= _MAX_HEADER:
                raise ValueError("no safetensors header length")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"`{param}` {path.name!r} is not a readable safetensors file ({exc}); expected "
                                  f"{EXPECTED}", param=param) from None
    if not isinstance(header, dict):
        raise InvalidRequestError(f"`{param}` {path.name!r} has a malformed safetensors header; expected {EXPECTED}",
                                  param=param)
    header.pop("__metadata__", None)
    return header


def checkpoint_type(header: dict[str, dict], name: str, param: str = "source") -> str:
    """diffusers' name for the checkpoint's model type (``v1``, ``v2``, ``xl_base``, ...), or a 400."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith(UNET_PREFIX) for k in header):
        raise InvalidRequestError(f"`{param}` {name!r} holds no Stable Diffusion UNet (no '{UNET_PREFIX}*' "
                                  f"tensors among its {len(header)}); expected {EXPECTED}", param=param)
    try:
        return infer_diffusers_model_type({k: _Shape(v["shape"]) for k, v in header.items()})
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise InvalidRequestError(f"`{param}` {name!r}: its model type could not be told from its tensors "
                                  f"({type(exc).__name__}); expected {EXPECTED}", param=param) from None


def import_single_file(src: Path, dest_dir: Path, name: str, *, config_dir: Path | None = None,
                       on_progress: Callable[[str], None] | None = None) -> DiffusionModelInfo:
    """Import one ``.safetensors`` Stable Diffusion checkpoint as a diffusers pipeline.

    Args:
        src: The checkpoint file.
        dest_dir: Where the model goes (as :func:`import_diffusers_model`).
        name: The store name.
        config_dir: A diffusers pipeline directory whose configs and tokenizers describe the
            checkpoint, instead of the shipped ones for its detected type (tests; custom shapes).
        on_progress: Called with a sentence at each stage.

    Raises:
        InvalidRequestError: Not a safetensors file, not a Stable Diffusion checkpoint, a type
            without shipped configs (SDXL refiner, inpainting, SD3, ...), or weights that do not
            fit the configs; ``param`` is ``src``.
    """
    src = Path(src)
    say = on_progress or (lambda message: None)
    if src.suffix.lower() in _PICKLE_SUFFIXES:
        raise InvalidRequestError(f"`src` {src.name!r} is a pickled checkpoint, which the appliance never loads "
                                  f"(it can run code); convert it to .safetensors first. Expected {EXPECTED}",
                                  param="src")
    if src.suffix.lower() != ".safetensors":
        raise InvalidRequestError(f"`src` {src.name!r} is not a .safetensors file; expected {EXPECTED}", param="src")
    header = read_header(src, param="src")
    kind = checkpoint_type(header, src.name, param="src")
    if config_dir is None and kind not in CONFIGS:
        raise InvalidRequestError(
            f"`src` {src.name!r} is a {kind!r} checkpoint; single-file import takes "
            f"{', '.join(DESCRIPTIONS.values())} checkpoints (import other pipelines as diffusers folders)",
            param="src")
    dtypes = Counter(v.get("dtype") for k, v in header.items() if k.startswith(UNET_PREFIX))
    dtype_name = _DTYPES.get(dtypes.most_common(1)[0][0], "float32")
    staging = Path(dest_dir).parent / f".single-file-{uuid.uuid4().hex}"
    staging.mkdir(parents=True, mode=0o700)
    try:
        if config_dir is None:
            configs, described = write_pipeline_configs(kind, staging / "configs"), DESCRIPTIONS[kind]
        else:
            configs = Path(config_dir)
            described = json.loads((configs / "model_index.json").read_text()).get("_class_name", "given configs")
        say(f"converting {src.name} ({described}, {dtype_name}) to the diffusers layout")
        _convert(src, configs, staging / "pipeline", dtype_name)
        say("checking the converted pipeline")
        return import_diffusers_model(staging / "pipeline", dest_dir, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _convert(src: Path, configs: Path, out: Path, dtype_name: str) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = json.loads((configs / "model_index.json").read_text())
    xl = index.get("_class_name") == "StableDiffusionXLPipeline"
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {"add_watermarker": False} if xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(src), config=str(configs), local_files_only=True,
                                    torch_dtype=getattr(torch, dtype_name), **extra)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:  # tensors that do not fit the configs
        raise InvalidRequestError(f"`src` {src.name!r} could not be converted as a {index.get('_class_name')} "
                                  f"({type(exc).__name__}: {str(exc)[:300]}); expected {EXPECTED}",
                                  param="src") from None
    pipe.save_pretrained(out, safe_serialization=True)
