"""Importing fidelity evaluators (a CLIP model, a DINO ViT) into the store, offline.

An evaluator is not a base model: it is never served or fine-tuned, it scores
image jobs (:mod:`appliance.diffusion.evaluation`). :func:`import_evaluator_model`
accepts a transformers folder as ``save_pretrained`` writes it (or a hub snapshot
copied onto the box):

* ``CLIPModel`` (``model_type`` ``clip``): CLIP-I and CLIP-T. Needs its tokenizer
  (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``) and ``preprocessor_config.json``.
* ``ViTModel`` (``vit``, e.g. ``facebook/dino-vits16``) or ``Dinov2Model`` (``dinov2``):
  DINO. Needs ``preprocessor_config.json``.

As for diffusers pipelines (:mod:`appliance.diffusion.importer`): safetensors only
(plain, sharded or one ``fp16``/``bf16``/``fp32`` variant; pickled weights are refused
unopened), known classes only (``architectures``, ``model_type`` and the image
processor's class are allow-listed), no ``.py`` file, and the weights are checked
by loading them (on the CPU; nothing missing). Only configs, tokenizer files and weights are
copied, to a staging directory renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from appliance.errors import ConflictError, InvalidRequestError
from appliance.modelstore.importer import hash_model_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

EvaluatorFamily = Literal["clip", "dino"]

#: ``architectures[0]`` -> (``model_type``, family). Nothing else is imported as an evaluator.
EVALUATOR_CLASSES: dict[str, tuple[str, EvaluatorFamily]] = {
    "CLIPModel": ("clip", "clip"),
    "ViTModel": ("vit", "dino"),
    "Dinov2Model": ("dinov2", "dino"),
}
#: ``model_type`` values that mark a folder as meant for an evaluator (so an unknown class in one is
#: refused here, naming it, rather than by the text-model importer).
EVALUATOR_MODEL_TYPES = ("clip", "clip_vision_model", "clip_text_model", "vit", "dinov2", "dinov2_with_registers",
                         "vit_mae", "vit_msn")
#: Image processor classes accepted in ``preprocessor_config.json`` (the ``Fast`` and ``Pil`` spellings too).
IMAGE_PROCESSORS = ("CLIPImageProcessor", "CLIPFeatureExtractor", "ViTImageProcessor", "ViTFeatureExtractor",
                    "BitImageProcessor")
_CONFIG_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass(frozen=True)
class EvaluatorModelInfo:
    """What the store knows about an imported evaluator.

    Attributes:
        name: The store name.
        family: ``clip`` (CLIP-I, CLIP-T) or ``dino`` (DINO).
        model_class: ``CLIPModel``, ``ViTModel`` or ``Dinov2Model``.
        image_processor: The image processor class named in ``preprocessor_config.json``.
        parameter_count: Parameters stored (from the safetensors headers).
        content_hash: ``sha256:<hex>`` over the stored files.
        size_bytes: Total size of the stored files.
    """

    name: str
    family: EvaluatorFamily
    model_class: str
    image_processor: str
    parameter_count: int
    content_hash: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_evaluator_folder(src: Path) -> bool:
    """Whether ``src`` is a transformers folder whose ``config.json`` names an image/CLIP encoder (cheap)."""
    config = Path(src) / "config.json"
    if not Path(src).is_dir() or (Path(src) / "model_index.json").exists() or not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") in EVALUATOR_MODEL_TYPES


def import_evaluator_model(src: Path, dest_dir: Path, name: str) -> EvaluatorModelInfo:
    """Import a CLIP model or DINO ViT folder as evaluator ``name``.

    Raises:
        InvalidRequestError: An unknown class or image processor, pickled-only or mismatched weights,
            custom code, missing tokenizer or preprocessor files; the message names the file.
        ConflictError: ``dest_dir`` exists and is not empty.
    """
    from appliance.diffusion.importer import _stored_tensors, _weight_files

    src, dest_dir = Path(src), Path(dest_dir)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequestError("`name` must be 1-128 characters of letters, digits, '.', '_' or '-', starting "
                                  f"with a letter or digit; got {name!r}", param="name")
    if not src.is_dir():
        raise InvalidRequestError(f"`src` {src} is not a directory", param="src")
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise ConflictError(f"`dest_dir` {dest_dir} already exists and is not empty; choose another", param="dest_dir")
    config = _read_json(src / "config.json")
    architectures = config.get("architectures") or []
    model_class = architectures[0] if isinstance(architectures, list) and architectures else None
    if model_class not in EVALUATOR_CLASSES or len(architectures) != 1:
        raise InvalidRequestError(
            f"`src` {src / 'config.json'}: `architectures` is {architectures!r}; an evaluator must be one of "
            f"{', '.join(EVALUATOR_CLASSES)} (custom or unknown classes are never imported)", param="src")
    model_type, family = EVALUATOR_CLASSES[model_class]
    if config.get("model_type") != model_type or "auto_map" in config:
        raise InvalidRequestError(
            f"`src` {src / 'config.json'}: a {model_class} has `model_type` {model_type!r} and no `auto_map`; got "
            f"{config.get('model_type')!r}" + (" with an `auto_map` (custom code)" if "auto_map" in config else ""),
            param="src")
    code = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py"))
    if code:
        raise InvalidRequestError(f"`src` {src} contains Python code ({', '.join(code[:3])}); custom code is never "
                                  "imported, remove it", param="src")
    processor = image_processor_class(_read_json(src / "preprocessor_config.json"), src / "preprocessor_config.json")
    if family == "clip" and not ((src / "tokenizer.json").is_file()
                                 or ((src / "vocab.json").is_file() and (src / "merges.txt").is_file())):
        raise InvalidRequestError(f"`src` {src} has no tokenizer files (tokenizer.json, or vocab.json and "
                                  "merges.txt): CLIP-T needs CLIP's tokenizer", param="src")

    staging = dest_dir.parent / f".{dest_dir.name}.importing-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for fname in _CONFIG_FILES:
            if (src / fname).is_file():
                shutil.copyfile(src / fname, staging / fname)
        files, index_file = _weight_files(src, "model")
        for path, stored_name in files:
            shutil.copyfile(path, staging / stored_name)
        if index_file is not None:
            shutil.copyfile(index_file, staging / "model.safetensors.index.json")
        stored = _stored_tensors(staging, [n for _, n in files])
        _check_weights(staging, model_class)
        count = 0
        for shape, _ in stored.values():
            n = 1
            for d in shape:
                n *= d
            count += n
        info = EvaluatorModelInfo(
            name=name, family=family, model_class=model_class, image_processor=processor, parameter_count=count,
            content_hash=hash_model_dir(staging),
            size_bytes=sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()))
        if dest_dir.exists():
            dest_dir.rmdir()
        staging.rename(dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def image_processor_class(preprocessor: dict[str, Any], path: Path | str = "preprocessor_config.json") -> str:
    """The allow-listed image processor class ``preprocessor_config.json`` names, without ``Fast``/``Pil``.

    Raises:
        InvalidRequestError: It names another class or none.
    """
    named = preprocessor.get("image_processor_type") or preprocessor.get("feature_extractor_type")
    base = named.removesuffix("Fast").removesuffix("Pil") if isinstance(named, str) else None
    if base not in IMAGE_PROCESSORS or "auto_map" in preprocessor:
        raise InvalidRequestError(f"`src` {path}: the image processor is {named!r}; supported: "
                                  f"{', '.join(IMAGE_PROCESSORS)} (no custom code)", param="src")
    return {"CLIPFeatureExtractor": "CLIPImageProcessor", "ViTFeatureExtractor": "ViTImageProcessor"}.get(base, base)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidRequestError(f"`src` {path} is missing (an evaluator needs config.json and "
                                  "preprocessor_config.json)", param="src")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"`src` {path} is not valid JSON: {exc}", param="src") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"`src` {path} must hold a JSON object", param="src")
    return data


def _check_weights(folder: Path, model_class: str) -> None:
    """Load the stored model on the CPU (offline, safetensors only) and check no weight it needs was missing.

    A real load rather than a comparison of names: transformers renames some checkpoints' tensors as it loads
    them (ViT's ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj`` in memory).
    """
    import transformers

    # The ViT pooler is not built: DINO takes [CLS], and DINO checkpoints may lack it.
    kwargs: dict[str, Any] = {"add_pooling_layer": False} if model_class == "ViTModel" else {}
    try:
        _, loading = getattr(transformers, model_class).from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype="auto", output_loading_info=True,
            trust_remote_code=False, **kwargs)
    except Exception as exc:
        raise InvalidRequestError(f"`src` {folder.name}: cannot be loaded as a {model_class}: {exc}",
                                  param="src") from None
    missing = sorted(loading.get("missing_keys", []))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InvalidRequestError(f"`src` {folder.name}: the {model_class} weights lack {shown} (truncated download "
                                  "or weights of another model?)", param="src")
