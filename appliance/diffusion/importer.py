"""Importing a diffusers Stable Diffusion pipeline into the store, offline.

:func:`import_diffusers_model` accepts a diffusers pipeline directory (what
``save_pretrained`` writes, or a hub snapshot copied onto the box): Stable
Diffusion 1.x/2.x (``StableDiffusionPipeline``) and SDXL
(``StableDiffusionXLPipeline``), told apart by ``model_index.json``'s
``_class_name`` and, for 1.x vs 2.x, the text encoder's width. It copies only
``model_index.json``, each component's configs, tokenizer files and
safetensors weights (plain, sharded, or only a ``fp16``/``bf16``/``fp32``
variant, stored under the plain names). Pickled weights (``.bin``, ``.ckpt``, ``.pt``, ...) are
never loaded or copied, and custom code is refused: every component must be a
known diffusers or transformers class, and no ``.py`` file may come along.

Before anything is kept, each model component's weights are checked against
its config (the model is built on the meta device: no memory, exact parameter
names) so a truncated or mismatched download fails here, naming the file.
The result is written to a staging directory and renamed into place; a
failed import leaves nothing behind. The returned :class:`DiffusionModelInfo`
carries a content hash over the stored files, computed as
:func:`appliance.modelstore.hash_model_dir` does for text models.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from appliance.errors import ConflictError, InvalidRequestError
from appliance.modelstore.importer import hash_model_dir

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Pipelines accepted, with the components each must have.
PIPELINES: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                  "scheduler"),
}
#: ``(library, class)`` allowed per component; schedulers are checked against diffusers itself.
_ALLOWED: dict[str, set[tuple[str, str]]] = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "vae": {("diffusers", "AutoencoderKL"), ("diffusers", "AutoencoderTiny")},
    "text_encoder": {("transformers", "CLIPTextModel"), ("transformers", "CLIPTextModelWithProjection")},
    "text_encoder_2": {("transformers", "CLIPTextModelWithProjection")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "tokenizer_2": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "safety_checker": {("stable_diffusion", "StableDiffusionSafetyChecker")},
    "feature_extractor": {("transformers", "CLIPImageProcessor"), ("transformers", "CLIPFeatureExtractor")},
    "image_encoder": {("transformers", "CLIPVisionModelWithProjection")},
}
_WEIGHTS = {"diffusers": "diffusion_pytorch_model", "stable_diffusion": "model", "transformers": "model"}
_CONFIG_FILES = (
    "config.json", "scheduler_config.json", "preprocessor_config.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
)
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

Family = Literal["sd1", "sd2", "sdxl", "sd-other"]


@dataclass(frozen=True)
class DiffusionModelInfo:
    """What the store knows about an imported diffusion pipeline.

    Attributes:
        name: The store name given at import.
        pipeline_class: ``model_index.json``'s ``_class_name``.
        family: ``sd1`` (CLIP ViT-L text encoder, 768 wide), ``sd2`` (OpenCLIP ViT-H, 1024),
            ``sdxl``, or ``sd-other`` (a Stable Diffusion pipeline of another width, e.g. the tiny test one).
        components: Component name to ``library.Class``.
        default_resolution: Default image size in pixels (UNet sample size x VAE scale factor).
        prediction_type: The scheduler's ``prediction_type`` (``epsilon``, ``v_prediction``, ...).
        parameter_count: Parameters of all model components (from the safetensors headers).
        dtype: Most common dtype of the UNet's stored weights.
        test_pipeline: Whether ``model_index.json`` marks it as a random test pipeline.
        content_hash: ``sha256:<hex>`` over the stored files (``appliance.modelstore.hash_model_dir``).
        size_bytes: Total size of the stored files.
    """

    name: str
    pipeline_class: str
    family: Family
    components: dict[str, str]
    default_resolution: int
    prediction_type: str
    parameter_count: int
    dtype: str
    test_pipeline: bool
    content_hash: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_diffusers_model(src: Path, dest_dir: Path, name: str) -> DiffusionModelInfo:
    """Import a diffusers Stable Diffusion (1.x/2.x) or SDXL pipeline directory.

    Args:
        src: A diffusers pipeline directory (with ``model_index.json``).
        dest_dir: Where the model goes; must not exist or be empty.
        name: The store name, ``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 characters.

    Returns:
        The imported model's :class:`DiffusionModelInfo`.

    Raises:
        InvalidRequestError: ``src`` is not a supported pipeline, has pickled-only or
            mismatched weights or custom code, or ``name`` is malformed. The message names the path.
        ConflictError: ``dest_dir`` exists and is not empty.
    """
    src, dest_dir = Path(src), Path(dest_dir)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequestError(
            "`name` must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit; got {name!r}", param="name")
    if not src.is_dir():
        what = "is a single file; convert it to a diffusers directory first" if src.is_file() else "does not exist"
        raise InvalidRequestError(f"`src` {src} {what}", param="src")
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise ConflictError(f"`dest_dir` {dest_dir} already exists and is not empty; choose another", param="dest_dir")

    index = _read_index(src)
    pipeline_class = index["_class_name"]
    components = _check_components(src, index, pipeline_class)
    code = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.py"))
    if code:
        raise InvalidRequestError(f"`src` {src} contains Python code ({', '.join(code[:3])}); custom pipeline code "
                                  "is never imported, remove it", param="src")

    staging = dest_dir.parent / f".{dest_dir.name}.importing-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(src / "model_index.json", staging / "model_index.json")
        parameter_count, dtypes = 0, Counter()
        for component, (library, cls) in components.items():
            count, dtype_counts = _copy_component(src, staging, component, library, cls)
            parameter_count += count
            if component == "unet":
                dtypes = dtype_counts
        info = _describe(staging, src, name, index, components, parameter_count, dtypes)
        if dest_dir.exists():
            dest_dir.rmdir()
        staging.rename(dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _read_index(src: Path) -> dict[str, Any]:
    path = src / "model_index.json"
    if not path.is_file():
        single = sorted(p.name for p in src.iterdir() if p.suffix in (".safetensors", ".ckpt"))
        hint = f" ({', '.join(single[:2])} look like single-file checkpoints; convert them with diffusers first)" \
            if single else ""
        raise InvalidRequestError(f"`src` {src} is not a diffusers pipeline: it has no model_index.json{hint}",
                                  param="src")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"`src` {path} is not valid JSON: {exc}", param="src") from None
    pipeline_class = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline_class not in PIPELINES:
        raise InvalidRequestError(
            f"`src` {path}: `_class_name` is {pipeline_class!r}; supported: {', '.join(PIPELINES)}", param="src")
    return index


def _check_components(src: Path, index: dict[str, Any], pipeline_class: str) -> dict[str, tuple[str, str]]:
    """``{component: (library, class)}`` for every non-null component, all allow-listed."""
    import diffusers

    out: dict[str, tuple[str, str]] = {}
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2:
            raise InvalidRequestError(f"`src` {src / 'model_index.json'}: component {key!r} must be "
                                      f"[library, class]; got {value!r}", param="src")
        library, cls = value
        if library is None and cls is None:
            continue
        allowed = _ALLOWED.get(key, set())
        is_scheduler = key == "scheduler" and library == "diffusers" and isinstance(cls, str) \
            and cls.endswith("Scheduler") and hasattr(diffusers, cls)
        if (library, cls) not in allowed and not is_scheduler:
            raise InvalidRequestError(
                f"`src` {src / 'model_index.json'}: component {key!r} is {library}.{cls}, which is not an allowed "
                "class (custom or unknown code is never imported)", param="src")
        if not (src / key).is_dir():
            raise InvalidRequestError(f"`src` {src / key} is missing (model_index.json lists {key!r})", param="src")
        out[key] = (library, cls)
    missing = [c for c in PIPELINES[pipeline_class] if c not in out]
    if missing:
        raise InvalidRequestError(f"`src` {src}: a {pipeline_class} needs {', '.join(missing)}", param="src")
    return out


def _copy_component(src: Path, staging: Path, component: str, library: str, cls: str) -> tuple[int, Counter]:
    """Copy configs, tokenizer files and weights of one component; check the weights match the config."""
    folder = src / component
    (staging / component).mkdir()
    for fname in _CONFIG_FILES:
        if (folder / fname).is_file():
            shutil.copyfile(folder / fname, staging / component / fname)
    if component in ("tokenizer", "tokenizer_2"):
        if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise InvalidRequestError(f"`src` {folder} has no tokenizer files (tokenizer.json or vocab.json + "
                                      "merges.txt)", param="src")
        return 0, Counter()
    if component in ("scheduler", "feature_extractor"):
        return 0, Counter()
    stem = _WEIGHTS[library]
    files, index_file = _weight_files(folder, stem)
    for path, stored_name in files:
        shutil.copyfile(path, staging / component / stored_name)
    if index_file is not None:  # stored under the plain name: the model loads without ``variant=``
        shutil.copyfile(index_file, staging / component / f"{stem}.safetensors.index.json")
    stored = _stored_tensors(staging / component, [name for _, name in files])
    _check_weights(folder, component, library, cls, set(stored))
    count = 0
    dtypes: Counter = Counter()
    for shape, dtype in stored.values():
        n = 1
        for d in shape:
            n *= d
        count += n
        dtypes[dtype] += n
    return count, dtypes


#: Weight variants accepted where a component has no plain weights, most preferred first.
VARIANTS = ("fp16", "bf16", "fp32")


def _weight_files(folder: Path, stem: str) -> tuple[list[tuple[Path, str]], Path | None]:
    """The component's safetensors files with the names they are stored under, and its shard index if any.

    Plain weights (``{stem}.safetensors`` or a shard index) are preferred; a folder holding only a
    variant (``{stem}.fp16.safetensors``, or ``{stem}.safetensors.index.fp16.json`` and its
    ``{stem}.fp16-0000N-of-0000M.safetensors`` shards, as diffusers and transformers write them with
    ``variant="fp16"``) is taken as well: a single variant file is stored as ``{stem}.safetensors``, a
    variant index as ``{stem}.safetensors.index.json`` (its shards keep their names), so the stored
    model loads without ``variant=``.
    """
    for variant in (None, *VARIANTS):
        single = folder / (f"{stem}.safetensors" if variant is None else f"{stem}.{variant}.safetensors")
        index_file = folder / (f"{stem}.safetensors.index.json" if variant is None
                               else f"{stem}.safetensors.index.{variant}.json")
        if single.is_file():
            return [(single, f"{stem}.safetensors")], None
        if index_file.is_file():
            return [(folder / s, s) for s in _shards(folder, index_file)], index_file
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    others = sorted(p.name for p in folder.glob(f"{stem}.*.safetensors"))
    if pickled:
        hint = (f" ({', '.join(pickled)} are pickle files, which the appliance never loads; convert them to "
                "safetensors)")
    elif others:
        hint = f" (only {others[0]}, a variant other than {', '.join(VARIANTS)})"
    else:
        hint = ""
    raise InvalidRequestError(f"`src` {folder} has no {stem}.safetensors weights{hint}", param="src")


def _shards(folder: Path, index_file: Path) -> list[str]:
    try:
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidRequestError(f"`src` {index_file} is not a valid shard index: {exc}", param="src") from None
    missing = [s for s in shards if not isinstance(s, str) or "/" in s or s.startswith(".")
               or not (folder / s).is_file()]
    if missing:
        raise InvalidRequestError(f"`src` {folder}: shard {missing[0]} listed in {index_file.name} is missing",
                                  param="src")
    return shards


def _stored_tensors(folder: Path, names: list[str]) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype), read from the safetensors headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[list[int], str]] = {}
    for fname in names:
        try:
            with safe_open(folder / fname, framework="pt") as fh:
                for key in fh.keys():
                    piece = fh.get_slice(key)
                    out[key] = (list(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise InvalidRequestError(f"`src` {folder.name}/{fname} is not a readable safetensors file: {exc}",
                                      param="src") from None
    return out


def _check_weights(folder: Path, component: str, library: str, cls: str, stored: set[str]) -> None:
    """Build the component on the meta device from its config and compare parameter names."""
    from accelerate import init_empty_weights

    try:
        if library == "transformers" or library == "stable_diffusion":
            import transformers
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            if library == "stable_diffusion":
                from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as model_cls
            else:
                model_cls = getattr(transformers, cls)
            with init_empty_weights():
                model = model_cls(config)
        else:
            import diffusers

            model_cls = getattr(diffusers, cls)
            with init_empty_weights():
                model = model_cls.from_config(model_cls.load_config(folder))
    except InvalidRequestError:
        raise
    except Exception as exc:
        raise InvalidRequestError(f"`src` {folder / 'config.json'} cannot be read as a {cls} config: {exc}",
                                  param="src") from None
    expected = set(model.state_dict())
    missing = sorted(expected - stored)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InvalidRequestError(f"`src` {folder}: the {component} weights lack {shown} (truncated download or "
                                  "weights of another model?)", param="src")


def _describe(staging: Path, src: Path, name: str, index: dict[str, Any], components: dict[str, tuple[str, str]],
              parameter_count: int, dtypes: Counter) -> DiffusionModelInfo:
    def config(component: str, fname: str = "config.json") -> dict[str, Any]:
        try:
            return json.loads((staging / component / fname).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"`src` {src / component / fname} cannot be read: {exc}", param="src") from None

    pipeline_class = index["_class_name"]
    unet, vae = config("unet"), config("vae")
    scheduler = config("scheduler", "scheduler_config.json")
    if pipeline_class == "StableDiffusionXLPipeline":
        family: Family = "sdxl"
    else:
        width = config("text_encoder").get("hidden_size")
        family = {768: "sd1", 1024: "sd2"}.get(width, "sd-other")
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, list) else sample
    files = [p for p in staging.rglob("*") if p.is_file()]
    dtype = dtypes.most_common(1)[0][0] if dtypes else "F32"
    return DiffusionModelInfo(
        name=name,
        pipeline_class=pipeline_class,
        family=family,
        components={k: f"{lib}.{cls}" for k, (lib, cls) in components.items()},
        default_resolution=int(sample) * scale,
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        parameter_count=parameter_count,
        dtype=_SAFETENSORS_DTYPES.get(dtype, dtype.lower()),
        test_pipeline="_appliance_test_pipeline" in index,
        content_hash=hash_model_dir(staging),
        size_bytes=sum(p.stat().st_size for p in files),
    )
