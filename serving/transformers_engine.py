"""The embedded engine: one transformers model in process, LoRA adapters through peft.

The base model is loaded once and never reloaded. Adapters are injected into it
as named peft LoRA layers from in-memory tensors (no files written), switched
per batch row and deleted on unload, so one batch can mix adapters.

All model work runs on one worker thread, which batches queued requests
("waves": requests that arrive while a wave runs join the next one) and
decodes token by token with its own loop so that every row has its own
adapter, sampling parameters, seed, stop strings and stream. Loading and
unloading adapters changes the model's modules, so it takes the model lock
that the worker holds for each forward step: a load waits at most one step
and never runs in the middle of one.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from appliance.errors import InvalidRequestError
from serving.adapters import AdapterFiles, BaseModelShape, ValidatedAdapter, check_adapter_name, validate_adapter
from serving.engine import AdapterInfo, AdapterRegistry, AdapterSource, GenerationStream, Pin, queue_events
from serving.errors import AdapterLoadError, EngineError
from serving.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Delta,
    GenerationRequest,
    GenerationResult,
    Usage,
)
from serving.text import TextTracker

log = logging.getLogger("serving.transformers")

__all__ = ["EngineConfig", "TransformersEngine"]

_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class EngineConfig:
    """Tunables of the embedded engine (the serving settings feed these).

    Attributes:
        max_resident_adapters: Most adapters injected at once; least recently used ones are evicted.
        max_lora_rank: Largest adapter rank accepted.
        max_batch_size: Most rows (choices) decoded together in one wave.
        default_max_tokens: Completion length when a chat request gives no ``max_tokens``.
        max_context: Prompt plus completion limit; ``None`` uses the model's ``max_position_embeddings``.
        check_adapter_values: Refuse adapters with NaN/inf weights (one pass over the tensors).
        mixed_batches: How a batch mixing adapters is computed: ``"stacked"`` (two matmuls per
            layer whatever the mix) or ``"peft"`` (peft's mixed-batch forward, a loop per adapter).
    """

    max_resident_adapters: int = 8
    max_lora_rank: int = 64
    max_batch_size: int = 8
    default_max_tokens: int = 512
    max_context: int | None = None
    check_adapter_values: bool = True
    mixed_batches: Literal["stacked", "peft"] = "stacked"


class TransformersEngine:
    """Serve one causal LM and its LoRA adapters in process (CPU or GPU).

    Args:
        model: A transformers causal LM, already on its device; it is put in eval mode.
        tokenizer: Its tokenizer, whose chat template formats chat requests.
        name: The name clients use for the base model (``request.model``).
        config: Engine tunables.
        adapter_source: Reloads an evicted adapter's files by name (decrypting them in memory).
        base_model_aliases: Other values of an adapter's ``base_model_name_or_path`` that mean this base.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        config: EngineConfig | None = None,
        adapter_source: AdapterSource | None = None,
        base_model_aliases: Sequence[str] = (),
    ) -> None:
        self.config = config or EngineConfig()
        self.base_model_name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = self.config.max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.shape = BaseModelShape.from_model(model, name, base_model_aliases)
        self._eos = _eos_ids(model, tokenizer)
        # transformers 5.24 renamed `past_key_values` to `cache`; accept both.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos[0]
        self._tok_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._lora = _LoraLayers(model, self.config.mixed_batches)
        self._ids = itertools.count()
        self._registry: AdapterRegistry[str] = AdapterRegistry(
            validate=self._validate, load=self._inject, unload=self._eject,
            max_resident=self.config.max_resident_adapters, source=adapter_source,
        )
        #: Counters for tests and the benchmark: waves run, waves mixing adapters, most rows in one wave.
        self.stats = {"waves": 0, "mixed_waves": 0, "max_rows": 0}
        self._pending: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name=f"serving-{name}", daemon=True)
        self._worker.start()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        name: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | Literal["auto"] | None = None,
        gguf_file: str | None = None,
        **kwargs: Any,
    ) -> TransformersEngine:
        """Load a base model directory (safetensors, or a GGUF file dequantised) and serve it.

        ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA and float32 on CPU.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **extra)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).to(device)
        aliases = [str(model_dir), Path(model_dir).name, *kwargs.pop("base_model_aliases", ())]
        return cls(model, tokenizer, name=name or Path(model_dir).name, base_model_aliases=aliases, **kwargs)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, files: AdapterFiles | Path | None = None, *,
                     replace: bool = False) -> AdapterInfo:
        """Validate and inject an adapter under ``name``; see :meth:`serving.engine.Engine.load_adapter`."""
        check_adapter_name(name, self.base_model_name)
        return self._registry.load(name, files, replace=replace)

    def unload_adapter(self, name: str) -> None:
        self._registry.unload(name)

    def adapters(self) -> list[AdapterInfo]:
        return self._registry.infos()

    def has_adapter(self, name: str) -> bool:
        return self._registry.has(name)

    def resident_adapters(self) -> list[str]:
        """Names whose weights are in the model now, least recently used first."""
        return self._registry.resident_names()

    def _validate(self, files: AdapterFiles | Path) -> ValidatedAdapter:
        return validate_adapter(files, self.shape, max_rank=self.config.max_lora_rank,
                                check_values=self.config.check_adapter_values)

    def _inject(self, name: str, adapter: ValidatedAdapter) -> str:
        # peft names modules after adapters and forbids dots: use an internal id, never the user's name.
        adapter_id = f"a{next(self._ids)}"
        with self._model_lock:
            self._lora.add(adapter_id, adapter)
        return adapter_id

    def _eject(self, adapter_id: str) -> None:
        with self._model_lock:
            self._lora.remove(adapter_id)

    # ------------------------------------------------------------------ prompts

    def apply_chat_template(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
        """Format ``messages`` with the base tokenizer's chat template, ending with the assistant prompt."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(f"base model {self.base_model_name!r} has no chat template; "
                                      "use /v1/completions", param="messages")
        plain = [
            {"role": m.role, "content": m.text()} if isinstance(m, ChatMessage)
            else {"role": m["role"], "content": _text_of(m.get("content"))}
            for m in messages
        ]
        with self._tok_lock:
            return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` to completion (blocking the calling thread)."""
        return self.stream(request).collect()

    def stream(self, request: GenerationRequest) -> GenerationStream:
        """Start ``request``; iterate the returned stream for :class:`Delta` as tokens arrive."""
        if self._closed:
            raise EngineError("the engine is closed")
        request.validate(self.max_context)
        prompts = self._prompts(request)
        max_tokens = self._max_tokens(request, max(len(p) for p in prompts))
        pin: Pin[str] | None = None
        if request.model != self.base_model_name:
            pin = self._registry.pin(request.model)
        job = _Job(
            adapter=pin.handle if pin else _BASE, pin=pin, prompts=prompts, n=request.n,
            max_tokens=max_tokens, stop=request.stop_list,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed, ignore_eos=request.ignore_eos,
        )
        with self._cv:
            self._pending.append(job)
            self._cv.notify()
        return GenerationStream(request.model, queue_events(job.out), on_close=job.cancel)

    def _prompts(self, request: GenerationRequest) -> list[list[int]]:
        if isinstance(request, ChatCompletionRequest):
            ids = [self._encode(self.apply_chat_template(request.messages), special=False)]
        else:
            ids = [self._encode(p, special=True) for p in request.prompts]
        for p in ids:
            if not p:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            if len(p) >= self.max_context:
                raise InvalidRequestError(
                    f"the prompt has {len(p)} tokens but this model's context is {self.max_context}",
                    param="messages" if isinstance(request, ChatCompletionRequest) else "prompt")
        return ids

    def _max_tokens(self, request: GenerationRequest, prompt_len: int) -> int:
        room = self.max_context - prompt_len
        asked = request.requested_max_tokens
        if asked is None:
            return min(self.config.default_max_tokens, room)
        if asked > room:
            name = "max_tokens" if isinstance(request, CompletionRequest) or request.max_completion_tokens is None \
                else "max_completion_tokens"
            raise InvalidRequestError(
                f"this model's context is {self.max_context} tokens; the prompt has {prompt_len}, so `{name}` "
                f"may be at most {room}, got {asked}", param=name)
        return asked

    def close(self) -> None:
        """Stop the worker (queued requests fail) and drop all adapters."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=30)
        self._registry.close()

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._pending:
                        job.fail(EngineError("the engine was closed before the request ran"))
                    self._pending.clear()
                    return
                jobs: list[_Job] = []
                rows = 0
                while self._pending and (not jobs or rows + self._pending[0].rows <= self.config.max_batch_size):
                    job = self._pending.popleft()
                    jobs.append(job)
                    rows += job.rows
            live = [j for j in jobs if not j.cancelled]
            for j in jobs:
                if j.cancelled:
                    j.finish()
            if not live:
                continue
            try:
                with torch.inference_mode():
                    self._run_wave(live)
            except Exception as exc:  # keep serving: fail this wave's requests only
                log.exception("generation failed")
                for j in live:
                    if not j.done:
                        j.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _run_wave(self, jobs: list[_Job]) -> None:
        rows: list[_Row] = []
        for job in jobs:
            job.started = time.perf_counter()
            for p_idx, prompt in enumerate(job.prompts):
                for k in range(job.n):
                    index = p_idx * job.n + k
                    gen = None
                    if job.temperature > 0:
                        gen = torch.Generator(device=self.device)
                        gen.manual_seed((job.seed + index) % 2**64 if job.seed is not None
                                        else int.from_bytes(os.urandom(8), "little"))
                    rows.append(_Row(job, index, prompt, gen, TextTracker(self._decode, job.stop)))
            job.prompt_tokens = sum(len(p) for p in job.prompts)

        self.stats["waves"] += 1
        self.stats["mixed_waves"] += len({j.adapter for j in jobs}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(self.model)

        logits = self._forward(rows, ids, mask, positions, cache)
        while True:
            next_ids = self._choose(rows, logits)
            keep: list[int] = []
            for i, (r, tok) in enumerate(zip(rows, next_ids, strict=True)):
                if r.job.cancelled:
                    continue
                self._advance(r, tok)
                if r.finish is None:
                    keep.append(i)
            for job in jobs:
                if not job.done and (job.cancelled or job.all_finished()):
                    job.finish()
            if not keep:
                return
            if len(keep) < len(rows):
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, positions = mask[sel], positions[sel]
                next_ids = [next_ids[i] for i in keep]
                rows = [rows[i] for i in keep]
            step = torch.tensor(next_ids, dtype=torch.long, device=self.device).unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self._forward(rows, step, mask, positions, cache)

    def _forward(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        with self._model_lock:
            self._lora.plan([r.job.adapter for r in rows])
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.generator is None:
                continue
            scores = logits[i] / r.job.temperature
            if r.job.top_p < 1.0:
                sorted_scores, order = scores.sort(descending=True)
                cum = sorted_scores.softmax(-1).cumsum(-1)
                drop = cum - sorted_scores.softmax(-1) >= r.job.top_p  # keep the smallest set reaching top_p
                scores = scores.scatter(0, order[drop], float("-inf"))
            probs = scores.softmax(-1)
            greedy[i] = int(torch.multinomial(probs, 1, generator=r.generator).item())
        return greedy

    def _advance(self, r: _Row, tok: int) -> None:
        job = r.job
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        r.generated += 1
        job.completion_tokens += 1
        if tok in self._eos and not job.ignore_eos:
            r.finish = "stop"
            job.put(Delta(r.index, r.text.finish(), "stop"))
            return
        text, stopped = r.text.add(tok)
        if stopped:
            r.finish = "stop"
            job.put(Delta(r.index, text, "stop"))
        elif r.generated >= job.max_tokens:
            r.finish = "length"
            job.put(Delta(r.index, text + r.text.finish(), "length"))
        elif text:
            job.put(Delta(r.index, text))
        if r.finish is not None:
            job.finished_rows += 1

    def __enter__(self) -> TransformersEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


@dataclass(eq=False)
class _Job:
    adapter: str
    pin: Pin[str] | None
    prompts: list[list[int]]
    n: int
    max_tokens: int
    stop: list[str]
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool = False
    out: queue.Queue[Any] = field(default_factory=queue.Queue)
    cancelled: bool = False
    done: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_rows: int = 0
    started: float = 0.0
    first_token_at: float | None = None

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def all_finished(self) -> bool:
        return self.finished_rows >= self.rows

    def cancel(self) -> None:
        self.cancelled = True

    def put(self, item: Any) -> None:
        self.out.put(item)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.pin is not None:
            self.pin.release()
        self.out.put(Usage(self.prompt_tokens, self.completion_tokens))
        self.out.put(None)

    def fail(self, exc: BaseException) -> None:
        if self.done:
            return
        self.done = True
        if self.pin is not None:
            self.pin.release()
        self.out.put(exc)


@dataclass(eq=False)
class _Row:
    job: _Job
    index: int
    prompt: list[int]
    generator: torch.Generator | None
    text: TextTracker
    generated: int = 0
    finish: str | None = None


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if not ids:
        raise ValueError("the tokenizer and generation config define no eos token")
    return frozenset(ids)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class _LoraLayers:
    """peft LoRA layers injected into the base model in place, and which adapter each row uses.

    :meth:`plan` sets, before each forward, which adapter each batch row uses:

    - one adapter (or the base) for the whole batch: that adapter becomes the layers'
      active one (peft's ordinary forward; switching walks the layers only on change);
    - a mix (``mixed="stacked"``, the default): the layers run the base only, and one
      permanent forward hook per layer adds every row's LoRA term with two matmuls over
      the concatenated A and B of the batch's adapters and a per-row mask that selects
      (and scales) the row's own block; the cost does not grow with the number of adapters;
    - a mix with ``mixed="peft"``: peft's mixed-batch forward (``adapter_names``), which
      loops over the adapters in every layer; passed through one permanent pre-forward
      hook per layer, since peft's own ``adapter_names=`` path walks the whole model and
      registers and removes hooks on every call.
    """

    def __init__(self, model: torch.nn.Module, mixed: Literal["stacked", "peft"] = "stacked") -> None:
        self.model = model
        self.mixed = mixed
        self._layers: list[Any] = []
        self._by_path: dict[str, Any] = {}
        self._hooked: set[int] = set()
        self._names: list[str] | None = None  # mixed="peft": adapter per row
        self._stacked: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._stacked_key: tuple[str, ...] | None = None
        self._stack_cache: dict[tuple[str, ...], dict[int, tuple[torch.Tensor, ...]]] = {}
        self._active: str | None = None  # adapter the layers have active; None: none (base)

    def add(self, adapter_id: str, adapter: ValidatedAdapter) -> None:
        from peft import LoraConfig

        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        cfg = LoraConfig(**{k: v for k, v in adapter.config.items() if k in fields and k != "peft_type"})
        cfg.inference_mode = True
        cfg.lora_dropout = 0.0
        cfg.init_lora_weights = False  # the weights come from the adapter; skip peft's random init
        try:
            if all(m in self._by_path for m in adapter.modules):
                self._add_to_existing_layers(adapter_id, adapter, cfg)
            else:
                self._inject(adapter_id, adapter, cfg)
        except Exception:
            self._delete(adapter_id)
            raise

    def _add_to_existing_layers(self, adapter_id: str, adapter: ValidatedAdapter, cfg: Any) -> None:
        # The common case: earlier adapters already wrapped these layers. peft's injection would walk
        # the whole model several times (hundreds of ms); adding to the known layers is what it does last.
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in adapter.tensors.items():
            module, ab = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            pairs.setdefault(module, {})[ab[0]] = t
        with torch.device("meta"):  # the placeholders peft creates cost nothing; real weights assigned below
            for module in pairs:
                self._by_path[module].update_layer(adapter_id, adapter.rank, adapter.alpha, config=cfg)
        for module, ab in pairs.items():
            layer = self._by_path[module]
            weight = layer.get_base_layer().weight
            device = weight.device
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            for name, tensor in (("lora_A", ab["A"]), ("lora_B", ab["B"])):
                sub = getattr(layer, name)[adapter_id]
                sub.weight = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)

    def _inject(self, adapter_id: str, adapter: ValidatedAdapter, cfg: Any) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        cfg.target_modules = list(adapter.modules)  # exactly the layers that have weights
        cfg.layers_to_transform = None
        cfg.layers_pattern = None
        try:
            with warnings.catch_warnings():
                # "Already found a `peft_config` attribute": several adapters in one model is the point here.
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)
                inject_adapter_in_model(cfg, self.model, adapter_name=adapter_id, low_cpu_mem_usage=True)
            dtype = next(self.model.parameters()).dtype
            state = {k: v.to(dtype=dtype) for k, v in adapter.tensors.items()}
            result = set_peft_model_state_dict(self.model, state, adapter_name=adapter_id, low_cpu_mem_usage=True)
            missing = [k for k in result.missing_keys if f".{adapter_id}." in k]
            if missing or result.unexpected_keys:
                raise AdapterLoadError(f"adapter weights did not match the injected layers (missing {missing[:3]}, "
                                       f"unexpected {list(result.unexpected_keys)[:3]})", param="files")
            self._check_materialised(adapter_id)
        finally:
            self._adopt_layers()

    def remove(self, adapter_id: str) -> None:
        self._delete(adapter_id)

    def plan(self, adapters: list[str]) -> None:
        """Set which adapter each row of the next forward uses (``__base__`` for none)."""
        first = adapters[0]
        if all(a == first for a in adapters):
            self._names, self._stacked, self._stacked_key = None, None, None
            self._activate(None if first == _BASE else first)
            return
        self._activate(None)
        if self.mixed == "peft":
            self._names = adapters
            return
        key = tuple(adapters)
        if key != self._stacked_key:
            ids = tuple(sorted(set(adapters) - {_BASE}))
            stacks = self._stacks(ids)
            slot = {aid: i for i, aid in enumerate(ids)}
            device = next(iter(stacks.values()))[0].device if stacks else torch.device("cpu")
            rows = torch.tensor([slot.get(a, -1) for a in adapters], device=device)
            self._stacked = {
                lid: (a_cat, b_cat, ((rows[:, None] == cols[None, :]) * scale).to(a_cat.dtype)[:, None, :])
                for lid, (a_cat, b_cat, cols, scale) in stacks.items()
            }
            self._stacked_key = key

    def _stacks(self, ids: tuple[str, ...]) -> dict[int, tuple[torch.Tensor, ...]]:
        """Per layer: A of the adapters concatenated [R, in], B [out, R], adapter slot and scaling per column."""
        cached = self._stack_cache.get(ids)
        if cached is not None:
            return cached
        out: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer in self._layers:
            present = [(i, aid) for i, aid in enumerate(ids) if aid in layer.lora_A]
            if not present:
                continue
            a_cat = torch.cat([layer.lora_A[aid].weight for _, aid in present], dim=0)
            b_cat = torch.cat([layer.lora_B[aid].weight for _, aid in present], dim=1)
            cols = torch.cat([torch.full((layer.r[aid],), i, device=a_cat.device) for i, aid in present])
            scale = torch.cat([torch.full((layer.r[aid],), float(layer.scaling[aid]), device=a_cat.device)
                               for _, aid in present])
            out[id(layer)] = (a_cat, b_cat, cols, scale)
        if len(self._stack_cache) >= 4:  # bounded: each entry copies its adapters' weights once
            self._stack_cache.clear()
        self._stack_cache[ids] = out
        return out

    def _activate(self, adapter_id: str | None) -> None:
        if adapter_id == self._active:
            return
        for layer in self._layers:
            layer.set_adapter([adapter_id] if adapter_id is not None and adapter_id in layer.lora_A else [])
        self._active = adapter_id

    def _delete(self, adapter_id: str) -> None:
        self._stack_cache = {k: v for k, v in self._stack_cache.items() if adapter_id not in k}
        self._stacked, self._stacked_key = None, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "... was active which is now deleted": we reset below
            for layer in self._layers_now():
                if adapter_id in layer.lora_A or adapter_id in layer.r:
                    layer.delete_adapter(adapter_id)
        configs = getattr(self.model, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(adapter_id, None)
        if self._active == adapter_id:
            self._active = "?"  # unknown: force the next plan to reset every layer
            self._activate(None)

    def _check_materialised(self, adapter_id: str) -> None:
        for layer in self._layers_now():
            if adapter_id in layer.lora_A:
                for p in (layer.lora_A[adapter_id].weight, layer.lora_B[adapter_id].weight):
                    if p.is_meta:
                        raise AdapterLoadError("a layer got no weights from the adapter", param="files")

    def _layers_now(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def _adopt_layers(self) -> None:
        # peft activates a freshly injected adapter; our plan decides what is active, so reset all layers.
        from peft.tuners.lora import LoraLayer

        self._by_path = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        self._layers = list(self._by_path.values())
        for layer in self._layers:
            if id(layer) not in self._hooked:
                layer.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
                layer.register_forward_hook(self._post_forward, with_kwargs=True)
                self._hooked.add(id(layer))
        self._stack_cache, self._stacked, self._stacked_key = {}, None, None
        self._active = "?"
        self._activate(None)

    def _pre_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self._names is not None:
            kwargs["adapter_names"] = self._names
        return args, kwargs

    def _post_forward(self, module: Any, args: Any, kwargs: dict[str, Any], output: torch.Tensor) -> Any:
        stacked = self._stacked
        if stacked is None:
            return None
        entry = stacked.get(id(module))
        if entry is None:
            return None
        a_cat, b_cat, mask = entry
        x = args[0] if args else kwargs["x"]
        xa = torch.matmul(x.to(a_cat.dtype), a_cat.t()).mul_(mask)
        return output + torch.matmul(xa, b_cat.t()).to(output.dtype)
