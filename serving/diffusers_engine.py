"""The image engine: one resident diffusers pipeline, LoRA adapters on it, DreamBooth models beside it.

One base pipeline (Stable Diffusion 1.x/2.x or SDXL) is loaded once. Two kinds
of fine-tune are served by name, both arriving as ``{file name: bytes}``
(decrypted in memory by the integrator) or through ``adapter_source(name)``:

* LoRA (``pytorch_lora_weights.safetensors``, diffusers format, as
  :mod:`appliance.diffusion` writes it): injected into the resident base with
  ``load_lora_weights(state_dict, adapter_name=...)``, switched per request and
  deleted with ``delete_adapters`` on unload. Switching is done per component
  (``set_adapters`` on the UNet, diffusers' text-encoder helpers) and LoRA is
  disabled on any component the requested adapter does not touch, so no other
  adapter's layers stay active there; base-model requests disable LoRA entirely.
* DreamBooth (``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``,
  optionally ``text_encoder/...``): served as its own pipeline that *shares* the
  base's VAE, tokenizer and (unless it was trained) text encoder objects, so each
  costs one UNet of memory.

Both are validated in full before anything touches the pipeline (key format,
every module exists in the base with the right shapes, rank limit, finite
values), so a broken adapter is refused with :class:`AdapterLoadError` and the
engine serves what it served before: a validated adapter never half-loads (a
failure inside diffusers is rolled back with ``delete_adapters``). An unknown
name is :class:`AdapterNotFoundError`. Names, per-name locks, pins and the LRU
bound on resident fine-tunes come from :class:`serving.engine.AdapterRegistry`.

Threading: diffusers pipelines are not thread-safe and LoRA loads mutate the
shared modules, so all pipeline work (loads, unloads, adapter switches and
generation) is serialised by one lock; requests from many threads are safe and
run one at a time (on a CPU they would compete for the same cores anyway).

``lora_mode="hotswap"``: ``enable_lora_hotswap(target_rank=max_lora_rank)`` is
called before the first load and every LoRA goes into one slot, replaced in
place (``load_lora_weights(..., hotswap=True)``) when a request needs another
adapter. That is what keeps a ``torch.compile``-d UNet from recompiling on GPU
hosts. It does not apply to text-encoder LoRA (diffusers cannot hotswap it, so
such adapters are refused in this mode), all adapters must target the same
modules as the first one, and on a CPU, where the UNet is not compiled, it buys
nothing: the default ``named`` mode keeps several adapters resident and
switches with ``set_adapters`` (see ``bench/images.py`` for both).
"""

from __future__ import annotations

import gc
import io
import itertools
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from serving.adapters import check_adapter_name
from serving.engine import AdapterInfo, AdapterRegistry, AdapterSource
from serving.diffusers_compat import text_encoder_lora_supported
from serving.errors import AdapterLoadError, EngineError, InvalidRequestError

log = logging.getLogger("serving.diffusers")

__all__ = ["DiffusersEngine", "DiffusersEngineConfig", "LORA_WEIGHTS", "ValidatedImageAdapter", "text_encoder_lora_supported"]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_DREAMBOOTH_FILES = {
    "unet": ("unet/config.json", "unet/diffusion_pytorch_model.safetensors"),
    "text_encoder": ("text_encoder/config.json", "text_encoder/model.safetensors"),
    "text_encoder_2": ("text_encoder_2/config.json", "text_encoder_2/model.safetensors"),  # SDXL
}
#: ``<component>.<module>.lora.down.weight`` (diffusers) or ``...lora_A.weight`` (peft); ``...alpha`` scalars.
_LORA_KEY = re.compile(
    r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<du>down|up)\.weight|(?P<alpha>alpha))$"
)
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class DiffusersEngineConfig:
    """Tunables of the image engine (the serving settings feed these).

    Attributes:
        max_resident_adapters: Most fine-tunes (LoRA adapters and DreamBooth UNets) resident at once;
            least recently used ones are evicted and reloaded on demand through ``adapter_source``.
        max_lora_rank: Largest LoRA rank accepted (and the hotswap slot's rank).
        lora_mode: ``named`` (several adapters resident, switched with ``set_adapters``) or
            ``hotswap`` (one slot replaced in place; for compiled UNets on GPU).
        max_n: Most images per request (OpenAI allows 1-10).
        max_pixels: Largest ``width * height``.
        max_inference_steps: Largest ``num_inference_steps``.
        default_inference_steps: When a request gives none; ``None`` = the pipeline's default (50).
        max_prompt_chars: Longest prompt or negative prompt.
        check_adapter_values: Refuse adapters with NaN/inf weights (one pass over the tensors).
    """

    max_resident_adapters: int = 8
    max_lora_rank: int = 64
    lora_mode: Literal["named", "hotswap"] = "named"
    max_n: int = 10
    max_pixels: int = 1024 * 1024
    max_inference_steps: int = 150
    default_inference_steps: int | None = None
    max_prompt_chars: int = 4000
    check_adapter_values: bool = True


@dataclass(frozen=True)
class ValidatedImageAdapter:
    """A parsed fine-tune that passed validation (the registry reads ``rank``, ``alpha``, ...).

    ``kind`` is ``lora`` or ``dreambooth``; a DreamBooth model reports rank 0 and
    its trained components as ``target_modules``.
    """

    kind: Literal["lora", "dreambooth"]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    tensors: dict[str, dict[str, torch.Tensor]]  # lora: {"all": state dict}; dreambooth: per component
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: frozenset[tuple[str, str]] = frozenset()
    nbytes: int = 0
    base_model: str | None = None

    @property
    def size_bytes(self) -> int:
        return self.nbytes


@dataclass
class _Handle:
    kind: Literal["lora", "dreambooth"]
    key: str
    adapter: ValidatedImageAdapter | None = None  # hotswap keeps the weights to swap in
    pipeline: Any = None  # dreambooth
    components: tuple[str, ...] = ()


class DiffusersEngine:
    """Serve one diffusers text-to-image pipeline with LoRA and DreamBooth fine-tunes.

    Implements :class:`serving.engine.ImageEngine` (the common :class:`~serving.engine.Engine`
    lifecycle plus image generation); registered as ``"diffusers"`` in :mod:`serving.registry`.

    Args:
        pipeline: A loaded ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` on its device.
        name: The name clients use for the base model (``model``).
        config: Engine tunables.
        adapter_source: Returns a fine-tune's files by name (decrypted in memory); used to reload evicted ones.
    """

    def __init__(self, pipeline: Any, *, name: str, config: DiffusersEngineConfig | None = None,
                 adapter_source: AdapterSource | None = None) -> None:
        self.config = config or DiffusersEngineConfig()
        if self.config.lora_mode not in ("named", "hotswap"):
            raise ValueError(f"`lora_mode` must be 'named' or 'hotswap'; got {self.config.lora_mode!r}")
        self.base_model_name = name
        self.pipe = pipeline
        self.pipe.set_progress_bar_config(disable=True)
        self.device = pipeline.unet.device
        self.dtype = pipeline.unet.dtype
        self.vae_scale_factor = getattr(pipeline, "vae_scale_factor", 8)
        sample = pipeline.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        self.default_size = int(sample) * self.vae_scale_factor
        self.lora_components = tuple(c for c in getattr(pipeline, "_lora_loadable_modules", ("unet", "text_encoder"))
                                     if getattr(pipeline, c, None) is not None)
        self._shapes = {c: _linear_shapes(getattr(pipeline, c)) for c in self.lora_components}
        self._state_shapes = {c: {k: tuple(v.shape) for k, v in getattr(pipeline, c).state_dict().items()}
                              for c in _DREAMBOOTH_FILES if getattr(pipeline, c, None) is not None}
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._active: str | None = None  # LoRA key active on the base, "" = LoRA disabled, None = unknown
        self._slot: str | None = None  # hotswap: key whose weights are in the slot
        self._slot_modules: frozenset[tuple[str, str]] | None = None
        self._closed = False
        if self.config.lora_mode == "hotswap":
            self.pipe.enable_lora_hotswap(target_rank=self.config.max_lora_rank)
        self._registry: AdapterRegistry[_Handle] = AdapterRegistry(
            validate=self._validate, load=self._load, unload=self._unload,
            max_resident=self.config.max_resident_adapters, source=adapter_source,
        )
        #: For tests and the benchmark: requests served, adapter switches and their latency (ms).
        self.stats: dict[str, Any] = {"requests": 0, "switches": 0, "switch_ms": deque(maxlen=10_000)}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, name: str | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> DiffusersEngine:
        """Load a pipeline directory offline and serve it.

        ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA and float32 on CPU.
        """
        from diffusers import DiffusionPipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
        return cls(pipe, name=name or Path(model_dir).name, **kwargs)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, files: Mapping[str, bytes] | Path | None = None, *,
                     replace: bool = False) -> AdapterInfo:
        """Validate, then load a LoRA or DreamBooth fine-tune under ``name`` (``files=None``: from ``adapter_source``).

        Raises:
            AdapterLoadError: Validation or loading failed; the engine serves what it served before.
            ConflictError: ``name`` is loaded and ``replace`` is false, or no room and no ``adapter_source``.
        """
        check_adapter_name(name, self.base_model_name)
        return self._registry.load(name, files, replace=replace)

    def unload_adapter(self, name: str) -> None:
        """Forget a fine-tune; waits for requests using it. Raises AdapterNotFoundError."""
        self._registry.unload(name)

    def adapters(self) -> list[AdapterInfo]:
        return self._registry.infos()

    def has_adapter(self, name: str) -> bool:
        return self._registry.has(name)

    def resident_adapters(self) -> list[str]:
        """Names whose weights are loaded now, least recently used first."""
        return self._registry.resident_names()

    def _validate(self, files: Mapping[str, bytes] | Path) -> ValidatedImageAdapter:
        files = _read_files(files)
        if LORA_WEIGHTS in files:
            return self._validate_lora(files[LORA_WEIGHTS])
        if any(name.startswith("unet/") for name in files):
            return self._validate_dreambooth(files)
        pickled = [n for n in files if n.endswith(_PICKLES)]
        if pickled:
            raise AdapterLoadError(f"{pickled[0]} is a pickle file, which is refused because loading it can run "
                                   "code; save the weights as safetensors", param="files")
        raise AdapterLoadError(f"the files {sorted(files)[:5]} are neither a LoRA ({LORA_WEIGHTS}) nor a DreamBooth "
                               "model (unet/config.json + unet/diffusion_pytorch_model.safetensors)", param="files")

    def _validate_lora(self, raw: bytes) -> ValidatedImageAdapter:
        tensors = _load_safetensors(raw, LORA_WEIGHTS)
        metadata = _safetensors_metadata(raw).get("lora_adapter_metadata")
        try:
            lora_meta = json.loads(metadata) if metadata else {}
        except ValueError:
            raise AdapterLoadError(f"{LORA_WEIGHTS}: its lora_adapter_metadata is not valid JSON",
                                   param=LORA_WEIGHTS) from None
        pairs: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
        alphas: dict[tuple[str, str], float] = {}
        for key, t in tensors.items():
            m = _LORA_KEY.match(key)
            if m is None:
                raise AdapterLoadError(
                    f"{LORA_WEIGHTS}: tensor {key!r} is not a diffusers-format LoRA weight "
                    "('<component>.<module>.lora.down.weight' or '...lora_A.weight'); kohya/A1111 files are not "
                    "served, convert them first", param=LORA_WEIGHTS)
            component = m["component"]
            if component not in self.lora_components:
                raise AdapterLoadError(f"{LORA_WEIGHTS}: tensor {key!r} targets {component!r}, which base model "
                                       f"{self.base_model_name!r} does not have (it has {', '.join(self.lora_components)})",
                                       param=LORA_WEIGHTS)
            _check_tensor(key, t, LORA_WEIGHTS, self.config.check_adapter_values)
            if m["alpha"]:
                if t.numel() != 1:
                    raise AdapterLoadError(f"{LORA_WEIGHTS}: {key!r} must be a scalar", param=LORA_WEIGHTS)
                alphas[(component, m["module"])] = float(t.reshape(()))
                continue
            side = m["ab"] or ("A" if m["du"] == "down" else "B")
            pairs.setdefault((component, m["module"]), {})[side] = (key, t)
        if not pairs:
            raise AdapterLoadError(f"{LORA_WEIGHTS} holds no tensors", param=LORA_WEIGHTS)
        ranks: dict[str, int] = {}
        for (component, module), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                missing = ({"A", "B"} - set(ab)).pop()
                raise AdapterLoadError(f"{LORA_WEIGHTS}: {component}.{module} has no lora_{missing} weight",
                                       param=LORA_WEIGHTS)
            shape = self._shapes[component].get(module)
            if shape is None:
                raise AdapterLoadError(f"{LORA_WEIGHTS}: {component}.{module} is not a linear or convolution layer of "
                                       f"base model {self.base_model_name!r}; was it trained on another base model?",
                                       param=LORA_WEIGHTS)
            a, b = ab["A"][1], ab["B"][1]
            rank = a.shape[0]
            fan_in, fan_out, kernel = shape
            want_a = (rank, fan_in, *kernel)
            want_b = (fan_out, rank, *((1, 1) if kernel else ()))
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise AdapterLoadError(
                    f"{LORA_WEIGHTS}: {component}.{module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                    f"base model {self.base_model_name!r} expects {want_a} and {want_b}", param=LORA_WEIGHTS)
            if rank > self.config.max_lora_rank:
                raise AdapterLoadError(f"{LORA_WEIGHTS}: {component}.{module} has rank {rank} but this engine serves "
                                       f"ranks up to {self.config.max_lora_rank}", param="rank")
            ranks[component] = max(ranks.get(component, 0), rank)
        components = sorted({c for c, _ in pairs})
        for component in components:
            for refused in ("rank_pattern", "alpha_pattern"):
                if lora_meta.get(f"{component}.{refused}"):
                    raise AdapterLoadError(f"{LORA_WEIGHTS}: per-layer ranks or alphas ({component}.{refused}) are "
                                           "not supported; use one rank", param=LORA_WEIGHTS)
        if any(c.startswith("text_encoder") for c in components):
            supported, why = text_encoder_lora_supported()
            if not supported:
                raise AdapterLoadError(f"{LORA_WEIGHTS}: this adapter has text-encoder LoRA weights, which cannot be "
                                       f"loaded here: {why}", param=LORA_WEIGHTS)
        if self.config.lora_mode == "hotswap":
            if components != ["unet"]:
                raise AdapterLoadError(f"{LORA_WEIGHTS}: this engine hotswaps LoRA (lora_mode='hotswap'), which "
                                       "diffusers supports for the UNet only; this adapter also targets "
                                       f"{', '.join(c for c in components if c != 'unet')}", param=LORA_WEIGHTS)
            modules = frozenset(pairs)
            if self._slot_modules is not None and modules != self._slot_modules:
                raise AdapterLoadError(f"{LORA_WEIGHTS}: in lora_mode='hotswap' every adapter must target the same "
                                       "modules as the first one loaded; this one differs", param=LORA_WEIGHTS)
        # Bake a non-default alpha into lora_B: diffusers drops file metadata when given a state dict.
        state: dict[str, torch.Tensor] = {}
        alpha_of: dict[str, float] = {}
        for component in components:
            r = lora_meta.get(f"{component}.r", ranks[component])
            alpha = lora_meta.get(f"{component}.lora_alpha", r)
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
                raise AdapterLoadError(f"{LORA_WEIGHTS}: {component}.lora_alpha must be a number; got {alpha!r}",
                                       param="lora_alpha")
            alpha_of[component] = float(alpha)
        for (component, module), ab in pairs.items():
            (a_key, a), (b_key, b) = ab["A"], ab["B"]
            rank = a.shape[0]
            scale = alphas.get((component, module), alpha_of[component]) / rank
            state[a_key] = a
            state[b_key] = b * scale if scale != 1.0 else b
        return ValidatedImageAdapter(
            kind="lora", rank=max(ranks.values()), alpha=alpha_of.get("unet", next(iter(alpha_of.values()))),
            target_modules=tuple(components), tensors={"all": state}, modules=frozenset(pairs), nbytes=len(raw),
        )

    def _validate_dreambooth(self, files: dict[str, bytes]) -> ValidatedImageAdapter:
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        configs: dict[str, dict[str, Any]] = {}
        unknown = sorted(n for n in files if n not in {f for pair in _DREAMBOOTH_FILES.values() for f in pair})
        if unknown:
            raise AdapterLoadError(f"DreamBooth model: unexpected file {unknown[0]!r} (expected "
                                   "unet/config.json, unet/diffusion_pytorch_model.safetensors and optionally "
                                   "text_encoder/config.json, text_encoder/model.safetensors and, on SDXL, "
                                   "text_encoder_2/...)", param="files")
        for component, (config_name, weights_name) in _DREAMBOOTH_FILES.items():
            present = [n for n in (config_name, weights_name) if n in files]
            if not present:
                continue
            if len(present) == 1:
                missing = weights_name if config_name in present else config_name
                raise AdapterLoadError(f"DreamBooth model: {missing} is missing", param="files")
            if component not in self._state_shapes:
                raise AdapterLoadError(f"DreamBooth model: base model {self.base_model_name!r} has no {component}",
                                       param="files")
            try:
                config = json.loads(files[config_name].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise AdapterLoadError(f"{config_name} is not valid JSON: {exc}", param=config_name) from None
            if not isinstance(config, dict):
                raise AdapterLoadError(f"{config_name} must hold a JSON object", param=config_name)
            state = _load_safetensors(files[weights_name], weights_name)
            expected = self._state_shapes[component]
            missing = sorted(set(expected) - set(state))
            extra = sorted(set(state) - set(expected))
            if missing or extra:
                what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which"
                raise AdapterLoadError(f"{weights_name} {what}{'' if missing else ' the base model does not have'}"
                                       f" ({len(missing)} missing, {len(extra)} unexpected); was it trained on "
                                       f"base model {self.base_model_name!r}?", param=weights_name)
            for key, t in state.items():
                if tuple(t.shape) != expected[key]:
                    raise AdapterLoadError(f"{weights_name}: {key!r} has shape {tuple(t.shape)}, the base model's "
                                           f"is {expected[key]}", param=weights_name)
                _check_tensor(key, t, weights_name, self.config.check_adapter_values)
            tensors[component], configs[component] = state, config
        if "unet" not in tensors:
            raise AdapterLoadError("DreamBooth model: unet/config.json and unet/diffusion_pytorch_model.safetensors "
                                   "are required", param="files")
        return ValidatedImageAdapter(kind="dreambooth", rank=0, alpha=0.0, target_modules=tuple(sorted(tensors)),
                                     tensors=tensors, configs=configs, nbytes=sum(len(b) for b in files.values()))

    def _load(self, name: str, adapter: ValidatedImageAdapter) -> _Handle:
        if self._closed:
            raise EngineError("the engine is closed")
        if adapter.kind == "dreambooth":
            pipeline = self._build_dreambooth(adapter)
            return _Handle(kind="dreambooth", key=f"d{next(self._ids)}", pipeline=pipeline,
                           components=adapter.target_modules)
        key = f"a{next(self._ids)}"  # peft forbids dots in adapter names: never use the user's name
        if self.config.lora_mode == "hotswap":
            with self._lock:
                if self._slot_modules is None:
                    self._slot_modules = adapter.modules
            return _Handle(kind="lora", key=key, adapter=adapter, components=adapter.target_modules)
        with self._lock:
            try:
                self.pipe.load_lora_weights(dict(adapter.tensors["all"]), adapter_name=key)
            except BaseException:
                self._forget_lora(key)
                raise
            finally:
                self._active = None
        return _Handle(kind="lora", key=key, components=adapter.target_modules)

    def _unload(self, handle: _Handle) -> None:
        with self._lock:
            if handle.kind == "dreambooth":
                handle.pipeline = None
            elif self.config.lora_mode == "hotswap":
                handle.adapter = None
                if self._slot == handle.key:
                    self._slot = None  # the weights stay in the slot until the next swap; base requests disable it
                    self._active = None
            else:
                self._forget_lora(handle.key)
                self._active = None
        gc.collect()

    def _forget_lora(self, key: str) -> None:
        try:
            present = {a for names in self.pipe.get_list_adapters().values() for a in names}
            if key in present:
                self.pipe.delete_adapters([key])
        except Exception:  # noqa: BLE001 - cleaning up after a failure must not hide it
            log.exception("could not delete LoRA adapter %s", key)

    def _build_dreambooth(self, adapter: ValidatedImageAdapter) -> Any:
        """A pipeline around the fine-tuned UNet (and text encoder), sharing the base's other components."""
        from accelerate import init_empty_weights

        unet_config = {k: v for k, v in adapter.configs["unet"].items() if not k.startswith("_")}
        with init_empty_weights():
            unet = type(self.pipe.unet).from_config(unet_config)
        unet.load_state_dict(adapter.tensors["unet"], strict=True, assign=True)
        unet.to(self.device, **({} if unet.dtype == self.dtype else {"dtype": self.dtype})).eval()
        components = dict(self.pipe.components)
        components["unet"] = unet
        for name in ("text_encoder", "text_encoder_2"):
            if name not in adapter.tensors:
                continue
            base_encoder = getattr(self.pipe, name)
            config = type(base_encoder.config).from_dict(adapter.configs[name])
            with init_empty_weights():
                text_encoder = type(base_encoder)(config)
            text_encoder.load_state_dict(adapter.tensors[name], strict=True, assign=True)
            text_encoder.to(self.device, **({} if text_encoder.dtype == self.dtype else {"dtype": self.dtype})).eval()
            components[name] = text_encoder
        components["scheduler"] = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        extra = {k: v for k, v in self.pipe.config.items() if not k.startswith("_") and k not in components}
        pipeline = type(self.pipe)(**components, **extra)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: str, *, model: str | None = None, n: int = 1, size: str | None = None,
                 seed: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | None = None) -> list[bytes]:
        """Generate ``n`` images for ``prompt`` with the base model or a fine-tune; PNG bytes each.

        Image ``i`` uses seed ``seed + i``, so a result is reproducible whatever ``n``.

        Raises:
            InvalidRequestError: A parameter is out of range (``param`` names it).
            AdapterNotFoundError: ``model`` is neither the base nor a loaded fine-tune.
            AdapterLoadError: The fine-tune was evicted and reloading it failed.
            EngineError: The pipeline failed.
        """
        if self._closed:
            raise EngineError("the engine is closed")
        model = self.base_model_name if model is None else model
        width, height, steps = self._check(prompt, model, n, size, seed, num_inference_steps, guidance_scale,
                                           negative_prompt)
        seed = int.from_bytes(os.urandom(6), "big") if seed is None else seed
        pin = None if model == self.base_model_name else self._registry.pin(model)
        try:
            with self._lock:
                try:
                    pipeline = self._activate(pin.handle if pin else None)
                except Exception as exc:
                    self._active = self._slot = None  # unknown state: the next request sets it afresh
                    log.exception("adapter switch failed")
                    raise EngineError(f"switching to {model!r} failed: {type(exc).__name__}: {exc}") from exc
                generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
                kwargs: dict[str, Any] = {"num_images_per_prompt": n, "height": height, "width": width,
                                          "generator": generators, "negative_prompt": negative_prompt}
                if steps is not None:
                    kwargs["num_inference_steps"] = steps
                if guidance_scale is not None:
                    kwargs["guidance_scale"] = guidance_scale
                try:
                    with torch.inference_mode():
                        images = pipeline(prompt, **kwargs).images
                except Exception as exc:
                    log.exception("image generation failed")
                    raise EngineError(f"image generation failed: {type(exc).__name__}: {exc}") from exc
                self.stats["requests"] += 1
        finally:
            if pin is not None:
                pin.release()
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    def _check(self, prompt: Any, model: Any, n: Any, size: Any, seed: Any, steps: Any, guidance: Any,
               negative: Any) -> tuple[int, int, int | None]:
        c = self.config
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError(f"`prompt` must be a non-empty string; got {prompt!r}", param="prompt")
        if len(prompt) > c.max_prompt_chars:
            raise InvalidRequestError(f"`prompt` must be at most {c.max_prompt_chars} characters; got {len(prompt)}",
                                      param="prompt")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError(f"`model` must be a model name; got {model!r}", param="model")
        if not _is_int(n) or not 1 <= n <= c.max_n:
            raise InvalidRequestError(f"`n` must be an integer from 1 to {c.max_n}; got {n!r}", param="n")
        if size is None:
            width = height = self.default_size
        else:
            m = _SIZE.match(size) if isinstance(size, str) else None
            if m is None:
                raise InvalidRequestError(f"`size` must look like '512x512' (width x height); got {size!r}",
                                          param="size")
            width, height = int(m[1]), int(m[2])
            multiple = self.vae_scale_factor
            if width < multiple or height < multiple or width % 8 or height % 8:
                raise InvalidRequestError(f"`size` must have width and height that are positive multiples of 8; "
                                          f"got {size!r}", param="size")
            if width * height > c.max_pixels:
                raise InvalidRequestError(f"`size` {size!r} has {width * height} pixels; this engine allows at most "
                                          f"{c.max_pixels} (e.g. {self.default_size}x{self.default_size})",
                                          param="size")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63 - 1000):
            raise InvalidRequestError(f"`seed` must be a non-negative integer below 2**63; got {seed!r}", param="seed")
        if steps is None:
            steps = c.default_inference_steps
        elif not _is_int(steps) or not 1 <= steps <= c.max_inference_steps:
            raise InvalidRequestError(f"`num_inference_steps` must be an integer from 1 to {c.max_inference_steps}; "
                                      f"got {steps!r}", param="num_inference_steps")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                     or not math.isfinite(guidance) or not 0 <= guidance <= 30):
            raise InvalidRequestError(f"`guidance_scale` must be a number from 0 to 30; got {guidance!r}",
                                      param="guidance_scale")
        if negative is not None and (not isinstance(negative, str) or len(negative) > c.max_prompt_chars):
            raise InvalidRequestError(f"`negative_prompt` must be a string of at most {c.max_prompt_chars} "
                                      f"characters; got {type(negative).__name__}", param="negative_prompt")
        return width, height, steps

    def _activate(self, handle: _Handle | None) -> Any:
        """Make the base pipeline compute with ``handle``'s LoRA (or none); the pipeline to call. Holds the lock."""
        if handle is not None and handle.kind == "dreambooth":
            # It shares the base's text encoder: no base LoRA may be active in it.
            self._set_lora(None)
            return handle.pipeline
        self._set_lora(handle)
        return self.pipe

    def _set_lora(self, handle: _Handle | None) -> None:
        want = "" if handle is None else handle.key
        if self._active == want:
            return
        started = time.perf_counter()
        if handle is not None and self.config.lora_mode == "hotswap" and self._slot != handle.key:
            assert handle.adapter is not None
            self.pipe.load_lora_weights(dict(handle.adapter.tensors["all"]), adapter_name="slot",
                                        hotswap=self._slot_loaded())
            self._slot = handle.key
        key = "slot" if self.config.lora_mode == "hotswap" else want
        for component in self.lora_components:
            module = getattr(self.pipe, component)
            present = _adapters_in(module)
            if not present:
                continue
            if handle is not None and key in present:
                _enable(module)
                _set_adapter(module, key)
            else:
                _disable(module)
        self._active = want
        if handle is not None:
            self.stats["switches"] += 1
            self.stats["switch_ms"].append((time.perf_counter() - started) * 1000)

    def _slot_loaded(self) -> bool:
        return any("slot" in _adapters_in(getattr(self.pipe, c)) for c in self.lora_components)

    def close(self) -> None:
        """Drop every fine-tune; later requests fail."""
        self._registry.close()
        self._closed = True

    def __enter__(self) -> DiffusersEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_files(source: Mapping[str, bytes] | Path | str) -> dict[str, bytes]:
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.is_dir():
            raise AdapterLoadError(f"adapter directory {str(root)!r} does not exist", param="files")
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    if not isinstance(source, Mapping):
        raise AdapterLoadError(f"adapter files must be a mapping of file name to bytes or a directory; got "
                               f"{type(source).__name__}", param="files")
    out: dict[str, bytes] = {}
    for key, value in source.items():
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise AdapterLoadError(f"adapter file {key!r} must be bytes; got {type(value).__name__}", param="files")
        out[str(key)] = bytes(value)
    return out


def _load_safetensors(raw: bytes, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise AdapterLoadError(f"{name} is not a readable safetensors file: {exc}", param=name) from None


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (already known to parse)."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _check_tensor(key: str, t: torch.Tensor, name: str, check_values: bool) -> None:
    if not t.is_floating_point():
        raise AdapterLoadError(f"{name}: tensor {key!r} has dtype {t.dtype}, expected a float type", param=name)
    if check_values and not bool(torch.isfinite(t).all()):
        raise AdapterLoadError(f"{name}: tensor {key!r} holds NaN or infinite values", param=name)


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """Module path -> (in, out, kernel) of every Linear and Conv2d layer (kernel ``()`` for Linear)."""
    out: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for path, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None:
            continue  # a peft wrapper: its base layer is listed under '<path>.base_layer'
        if path.endswith(".base_layer"):
            path = path[: -len(".base_layer")]
        if isinstance(module, torch.nn.Linear):
            out[path] = (module.in_features, module.out_features, ())
        elif isinstance(module, torch.nn.Conv2d):
            out[path] = (module.in_channels, module.out_channels, tuple(module.kernel_size))
    return out


def _adapters_in(module: Any) -> set[str]:
    config = getattr(module, "peft_config", None)
    return set(config) if isinstance(config, dict) else set()


def _enable(module: Any) -> None:
    from diffusers.loaders.lora_base import enable_lora_for_text_encoder

    if hasattr(module, "enable_lora") and not isinstance(module, _pretrained_model()):
        module.enable_lora()
    else:
        enable_lora_for_text_encoder(module)


def _disable(module: Any) -> None:
    from diffusers.loaders.lora_base import disable_lora_for_text_encoder

    if hasattr(module, "disable_lora") and not isinstance(module, _pretrained_model()):
        module.disable_lora()
    else:
        disable_lora_for_text_encoder(module)


def _set_adapter(module: Any, key: str) -> None:
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    if isinstance(module, _pretrained_model()):
        set_adapters_for_text_encoder([key], module, [1.0])
    else:
        module.set_adapters([key], [1.0])


def _pretrained_model() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel
