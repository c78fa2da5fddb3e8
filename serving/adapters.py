"""Validate a PEFT LoRA adapter before any engine touches it.

An adapter arrives as ``{filename: bytes}`` (decrypted in memory by the caller)
or as a directory. :func:`validate_adapter` parses ``adapter_config.json`` and
``adapter_model.safetensors`` without writing anything, and checks the rules
both engines need (vLLM refuses the same things at load time, later and with
vaguer messages): LoRA only, rank within the limit, no ``modules_to_save``, no
DoRA or bias, every target module exists in the base model and every tensor
has the shape the base model's layer implies, all values finite. Pickle files
(``adapter_model.bin``) are refused: loading one would run arbitrary code.

Every failure raises :class:`~serving.errors.AdapterLoadError` naming the file,
field or tensor at fault.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.errors import AdapterLoadError, InvalidRequestError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterFiles",
    "BaseModelShape",
    "ValidatedAdapter",
    "check_adapter_name",
    "read_adapter_files",
    "validate_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AdapterFiles = Mapping[str, bytes]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,254}$")
# vLLM's rule (vllm.lora.utils.parse_fine_tuned_lora_name): a LoRA weight's key ends in exactly
# ``.lora_A.weight`` or ``.lora_B.weight``; one that still carries peft's adapter name is refused.
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_NAMED_KEY_RE = re.compile(r"\.lora_[AB]\.(?P<adapter>[^.]+)\.weight$")
#: LoraConfig fields whose presence with a non-neutral value we refuse, and why.
_REFUSED = {
    "modules_to_save": "`modules_to_save` (fully trained layers such as embed_tokens or lm_head) is not servable "
    "by vLLM; retrain without it",
    "use_dora": "DoRA adapters (`use_dora`: true) are not supported; retrain with plain LoRA",
    "rank_pattern": "per-layer ranks (`rank_pattern`) are not supported; use one `r`",
    "alpha_pattern": "per-layer alphas (`alpha_pattern`) are not supported; use one `lora_alpha`",
    "target_parameters": "`target_parameters` (LoRA on raw parameters) is not supported; target modules",
    "fan_in_fan_out": "`fan_in_fan_out` adapters (Conv1D bases) are not supported",
    "lora_bias": "`lora_bias` is not supported; retrain without it",
    "trainable_token_indices": "`trainable_token_indices` is not supported; retrain without it",
}


def check_adapter_name(name: object, base_model_name: str | None = None) -> str:
    """Return ``name`` if it can name an adapter, else raise :class:`InvalidRequestError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequestError(
            f"adapter name {name!r} is invalid: use 1-255 characters from letters, digits and ._:@+/- "
            "starting with a letter or digit",
            param="name",
        )
    if base_model_name is not None and name == base_model_name:
        raise InvalidRequestError(f"adapter name {name!r} is the base model's name; choose another", param="name")
    return name


@dataclass(frozen=True)
class BaseModelShape:
    """What adapter validation needs to know about a base model.

    Attributes:
        name: The name clients use for the base model.
        accepted_names: Values of an adapter's ``base_model_name_or_path`` taken as this base.
        linear: Module path (as in the base model, e.g. ``model.layers.0.self_attn.q_proj``) to
            ``(in_features, out_features)`` for every LoRA-able linear layer (``lm_head`` excluded).
    """

    name: str
    accepted_names: frozenset[str]
    linear: Mapping[str, tuple[int, int]]

    @classmethod
    def from_model(cls, model: torch.nn.Module, name: str, aliases: Iterable[str] = ()) -> BaseModelShape:
        """Read the linear layers of ``model`` (a plain, not yet LoRA-wrapped transformers model)."""
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linear = {
            path: (mod.in_features, mod.out_features)
            for path, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod is not out_emb
        }
        names = {name, *aliases}
        src = getattr(getattr(model, "config", None), "_name_or_path", None)
        if src:
            names.add(str(src))
        return cls(name=name, accepted_names=frozenset(n for n in names if n), linear=linear)

    @classmethod
    def from_config_dir(cls, base_dir: Path, name: str, aliases: Iterable[str] = ()) -> BaseModelShape:
        """Build the shape from a model directory's ``config.json`` on the meta device (no weights read)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls.from_model(model, name, [str(base_dir), Path(base_dir).name, *aliases])

    def accepts(self, base: str | None) -> bool:
        if not base:
            return True
        if base in self.accepted_names:
            return True
        tail = Path(base).name
        return any(Path(n).name == tail for n in self.accepted_names)


@dataclass(frozen=True)
class ValidatedAdapter:
    """A parsed adapter that passed validation.

    Attributes:
        config: The ``adapter_config.json`` object as written by peft.
        tensors: peft-format keys (``base_model.model.<module>.lora_A.weight``) to tensors (CPU).
        modules: Module paths the adapter changes.
        files: The two files an engine needs (for the vLLM engine's directory).
    """

    config: dict[str, Any]
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    base_model: str | None
    tensors: dict[str, torch.Tensor]
    modules: tuple[str, ...]
    files: dict[str, bytes]

    @property
    def size_bytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_files(source: AdapterFiles | Path | str) -> dict[str, bytes]:
    """Return the files of an adapter given as a mapping or a directory (only the two that matter)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_dir():
            raise AdapterLoadError(f"adapter directory {str(path)!r} does not exist", param="files")
        files = {p.name: p.read_bytes() for p in path.iterdir() if p.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        if ADAPTER_WEIGHTS not in files and (path / "adapter_model.bin").exists():
            files["adapter_model.bin"] = b""
        return files
    if not isinstance(source, Mapping):
        raise AdapterLoadError(f"adapter files must be a mapping of file name to bytes or a directory, got "
                               f"{type(source).__name__}", param="files")
    out: dict[str, bytes] = {}
    for key, value in source.items():
        base = Path(str(key)).name
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise AdapterLoadError(f"adapter file {key!r} must be bytes, got {type(value).__name__}", param="files")
        if base in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"):
            out[base] = bytes(value)
    return out


def validate_adapter(
    source: AdapterFiles | Path | str,
    base: BaseModelShape | None,
    *,
    max_rank: int,
    check_values: bool = True,
) -> ValidatedAdapter:
    """Parse and check an adapter; raise :class:`AdapterLoadError` on the first problem.

    Args:
        source: ``{file name: bytes}`` or a directory holding ``adapter_config.json`` and
            ``adapter_model.safetensors``.
        base: The base model's shape; ``None`` skips the base-model checks (a vLLM client
            without a local copy of the base's config).
        max_rank: Largest ``r`` accepted (vLLM's ``--max-lora-rank``).
        check_values: Refuse NaN or infinite weights (costs one pass over the tensors).
    """
    files = read_adapter_files(source)
    if ADAPTER_CONFIG not in files:
        raise AdapterLoadError(f"the adapter has no {ADAPTER_CONFIG}; save it with peft's save_pretrained",
                               param="files")
    if ADAPTER_WEIGHTS not in files:
        if "adapter_model.bin" in files:
            raise AdapterLoadError("adapter_model.bin (pickle) is refused because loading it can run code; "
                                   "save with safe_serialization=True to get adapter_model.safetensors",
                                   param="files")
        raise AdapterLoadError(f"the adapter has no {ADAPTER_WEIGHTS}", param="files")

    config = _parse_config(files[ADAPTER_CONFIG])
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: `r` must be a positive integer, got {rank!r}", param="r")
    if rank > max_rank:
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: `r` is {rank} but this engine serves ranks up to {max_rank} "
                               "(vLLM's --max-lora-rank); retrain with a smaller rank or raise the limit", param="r")
    if "lora_alpha" not in config:
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: `lora_alpha` is missing (vLLM requires it); save the adapter "
                               "with peft's save_pretrained, which writes it", param="lora_alpha")
    alpha = config["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: `lora_alpha` must be a number, got {alpha!r}", param="lora_alpha")
    targets = config.get("target_modules")
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        targets = tuple(sorted(targets))
    elif not (isinstance(targets, str) and targets):
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: `target_modules` must be a list of module names or a regex, "
                               f"got {targets!r}", param="target_modules")
    base_name = config.get("base_model_name_or_path")
    if base is not None and not base.accepts(base_name):
        raise AdapterLoadError(f"the adapter was trained on base model {base_name!r} but this engine serves "
                               f"{base.name!r}", param="base_model_name_or_path")

    tensors = _parse_weights(files[ADAPTER_WEIGHTS])
    modules = _check_tensors(tensors, rank, targets, base, check_values)
    return ValidatedAdapter(
        config=config, rank=rank, alpha=float(alpha), use_rslora=bool(config.get("use_rslora")),
        target_modules=targets, base_model=base_name, tensors=tensors, modules=modules,
        files={ADAPTER_CONFIG: files[ADAPTER_CONFIG], ADAPTER_WEIGHTS: files[ADAPTER_WEIGHTS]},
    )


def _parse_config(raw: bytes) -> dict[str, Any]:
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}", param=ADAPTER_CONFIG) from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{ADAPTER_CONFIG} must hold a JSON object, got {type(config).__name__}",
                               param=ADAPTER_CONFIG)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: only LoRA adapters are served; `peft_type` is {peft_type!r}",
                               param="peft_type")
    for key, why in _REFUSED.items():
        if config.get(key) not in (None, False, [], {}, ""):
            raise AdapterLoadError(f"{ADAPTER_CONFIG}: {why} (got {key}={config[key]!r})", param=key)
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"{ADAPTER_CONFIG}: `bias` must be 'none', got {config['bias']!r}", param="bias")
    return config


def _parse_weights(raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS} is not a readable safetensors file: {exc}",
                               param=ADAPTER_WEIGHTS) from None
    if not tensors:
        raise AdapterLoadError(f"{ADAPTER_WEIGHTS} holds no tensors", param=ADAPTER_WEIGHTS)
    return tensors


def _matches(module: str, targets: tuple[str, ...] | str) -> bool:
    # peft's rule: a list entry matches the full path or its last components; a string is a full-match regex.
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    rank: int,
    targets: tuple[str, ...] | str,
    base: BaseModelShape | None,
    check_values: bool,
) -> tuple[str, ...]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        named = _NAMED_KEY_RE.search(key)
        if m is None and named is not None:
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: tensor {key!r} carries the adapter name "
                                   f"{named['adapter']!r}, which vLLM refuses; keys must end in .lora_A.weight or "
                                   ".lora_B.weight (peft's save_pretrained writes them so)", param=ADAPTER_WEIGHTS)
        if m is None:
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA A/B weight (embeddings, "
                                   "biases and fully trained modules are not servable)", param=ADAPTER_WEIGHTS)
        if not t.is_floating_point():
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: tensor {key!r} has dtype {t.dtype}, expected a float type",
                                   param=ADAPTER_WEIGHTS)
        if check_values and not bool(torch.isfinite(t).all()):
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: tensor {key!r} holds NaN or infinite values",
                                   param=ADAPTER_WEIGHTS)
        pairs.setdefault(m["module"], {})[m["ab"]] = t

    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: module {module!r} has no lora_{missing} weight",
                                   param=ADAPTER_WEIGHTS)
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}, inconsistent with r={rank}", param=ADAPTER_WEIGHTS)
        if base is None:
            continue
        if module not in base.linear:
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: module {module!r} is not a linear layer of base model "
                                   f"{base.name!r} (LoRA on lm_head or embeddings is not servable)",
                                   param=ADAPTER_WEIGHTS)
        fan_in, fan_out = base.linear[module]
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: module {module!r} expects ({fan_out}×{fan_in}) but the "
                                   f"adapter has lora_B {tuple(b.shape)} · lora_A {tuple(a.shape)}; was it "
                                   f"trained on another base model?", param=ADAPTER_WEIGHTS)
    if base is not None:
        names = targets if isinstance(targets, str) else targets
        if isinstance(names, tuple):
            for t in names:
                if t in ("lm_head", "embed_tokens") or not any(_matches(p, (t,)) for p in base.linear):
                    raise AdapterLoadError(f"{ADAPTER_CONFIG}: target module {t!r} matches no linear layer of "
                                           f"base model {base.name!r}", param="target_modules")
        elif not any(_matches(p, names) for p in base.linear):
            raise AdapterLoadError(f"{ADAPTER_CONFIG}: target_modules regex {names!r} matches no linear layer of "
                                   f"base model {base.name!r}", param="target_modules")
        for module in pairs:
            if not _matches(module, targets):
                raise AdapterLoadError(f"{ADAPTER_WEIGHTS}: module {module!r} has weights but is not in "
                                       f"target_modules {targets!r}", param=ADAPTER_WEIGHTS)
    return tuple(sorted(pairs))
