"""The embedded engine: one transformers model in process, LoRA adapters through peft.

The base model is loaded once and never reloaded. Adapters are injected into it
as named peft LoRA layers from in-memory tensors (no files written), switched
per batch row and deleted on unload, so one batch can mix adapters.

All model work runs on one worker thread, which batches requests and decodes
token by token with its own loop, so that every row has its own adapter,
sampling parameters, seed, stop strings and stream. Requests that arrive while
a batch runs are prefilled between two decode steps and join it (their KV
cache is left-padded to the batch's length), up to ``max_batch_size`` rows;
finished rows leave at once. Loading and
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
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from serving.adapters import AdapterFiles, BaseModelShape, ValidatedAdapter, check_adapter_name, validate_adapter
from serving.engine import AdapterInfo, AdapterRegistry, AdapterSource, GenerationStream, Pin, queue_events
from serving.errors import AdapterLoadError, EngineError, InvalidRequestError
from serving.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Delta,
    GenerationRequest,
    GenerationResult,
    Usage,
    message_text,
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
        lora_compute: Who computes the LoRA terms. ``"fused"``: per layer, one matrix product
            with the batch's adapters' A matrices side by side, a per-row mask, and one
            accumulating product with their B matrices (2-3 kernels whatever the mix of
            adapters). ``"peft"``: peft's own forward (the active adapter for a batch on one
            adapter, its mixed-batch loop over adapters otherwise).
    """

    max_resident_adapters: int = 8
    max_lora_rank: int = 64
    max_batch_size: int = 8
    default_max_tokens: int = 512
    max_context: int | None = None
    check_adapter_values: bool = True
    lora_compute: Literal["fused", "peft"] = "fused"


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
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos)
        self._tok_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._lora = _LoraLayers(model, self.config.lora_compute)
        self._ids = itertools.count()
        self._registry: AdapterRegistry[str] = AdapterRegistry(
            validate=self._validate, load=self._inject, unload=self._eject,
            max_resident=self.config.max_resident_adapters, source=adapter_source,
        )
        #: Counters for tests and the benchmark: prefills, decode steps mixing adapters, most rows in a prefill.
        self.stats = {"batches": 0, "mixed_steps": 0, "max_rows": 0}
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
            else {"role": m["role"], "content": message_text(m.get("content"))}
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
                    self._run_batch(live)
            except Exception as exc:  # keep serving: fail this wave's requests only
                log.exception("generation failed")
                for j in live:
                    if not j.done:
                        j.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Decode ``jobs`` together; between steps, requests that arrived join the running batch."""
        batch = self._prefill(jobs)
        joinable = _joinable(batch.cache)
        while batch.rows:
            if joinable and len(batch.rows) < self.config.max_batch_size:
                joiners = self._take_pending(self.config.max_batch_size - len(batch.rows))
                if joiners:
                    batch.merge(self._prefill(joiners))
            if not batch.rows:
                return
            step = torch.tensor(batch.next_ids, dtype=torch.long, device=self.device).unsqueeze(-1)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=-1)
            batch.positions = batch.positions[:, -1:] + 1
            logits = self._forward(batch.rows, step, batch.mask, batch.positions, batch.cache)
            self._sample_and_advance(batch, logits)

    def _prefill(self, jobs: list[_Job]) -> _Batch:
        """Run the prompts of ``jobs`` (left-padded) and choose each row's first token."""
        rows: list[_Row] = []
        for job in jobs:
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
        self.stats["batches"] += 1
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
        batch = _Batch(jobs=list(jobs), rows=rows, cache=cache, mask=mask, positions=positions)
        self._sample_and_advance(batch, logits)
        return batch

    def _sample_and_advance(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Choose each row's next token, emit text, finish jobs, drop finished rows."""
        next_ids = self._choose(batch.rows, logits)
        keep: list[int] = []
        for i, (r, tok) in enumerate(zip(batch.rows, next_ids, strict=True)):
            if r.job.cancelled:
                continue
            self._advance(r, tok)
            if r.finish is None:
                keep.append(i)
        for job in batch.jobs:
            if not job.done and (job.cancelled or job.all_finished()):
                job.finish()
        batch.jobs = [j for j in batch.jobs if not j.done]
        batch.next_ids = next_ids
        batch.keep(keep, self.device)

    def _take_pending(self, room: int) -> list[_Job]:
        taken: list[_Job] = []
        with self._cv:
            while self._pending and self._pending[0].rows <= room:
                job = self._pending.popleft()
                if job.cancelled:
                    job.finish()
                    continue
                taken.append(job)
                room -= job.rows
        return taken

    def _forward(self, rows: list[_Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        plan = [r.job.adapter for r in rows]
        if len(set(plan)) > 1:
            self.stats["mixed_steps"] += 1
        with self._model_lock:
            self._lora.plan(plan)
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
        r.generated += 1
        job.completion_tokens += 1
        if tok in self._eos and not job.ignore_eos:
            r.finish = "stop"
            job.put(Delta(r.index, r.text.finish(), "stop"))
            job.finished_rows += 1
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


@dataclass(eq=False)
class _Batch:
    """Rows being decoded together, their KV cache, attention mask and positions."""

    jobs: list[_Job]
    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    next_ids: list[int] = field(default_factory=list)

    def keep(self, keep: list[int], device: torch.device) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.next_ids = [self.next_ids[i] for i in keep]
        if keep:
            sel = torch.tensor(keep, device=device)
            self.cache.batch_select_indices(sel)
            self.mask, self.positions = self.mask[sel], self.positions[sel]

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows; the shorter cache is left-padded (masked out) to the longer."""
        self.jobs += other.jobs
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.next_ids = (
                other.rows, other.cache, other.mask, other.positions, other.next_ids)
            return
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(other.mask, length, 1)])
        self.positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])
        self.rows += other.rows
        self.next_ids += other.next_ids


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _joinable(cache: Any) -> bool:
    # Joining concatenates per-layer key/value tensors; only plain (full-attention) dynamic layers allow it.
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and hasattr(layer, "keys")
                                for layer in layers)


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


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class _LoraLayers:
    """peft LoRA layers injected into the base model in place, and which adapter each row uses.

    peft parses the config, wraps the targeted layers and holds each adapter's A and B
    matrices; :meth:`plan` sets, before each forward, which adapter each batch row uses.
    With ``compute="fused"`` the peft layers are left with no active adapter (they run
    the base layer) and one permanent forward hook per layer adds the LoRA term:
    ``out += ((x @ A_cat.T) * mask) @ B_cat.T``, where ``A_cat``/``B_cat`` hold the
    batch's adapters side by side and ``mask`` selects and scales each row's own block
    (for a batch on one adapter, ``out += (x @ A.T) @ B.T * scale``). The number of
    kernels per layer does not grow with the number of adapters in the batch.

    With ``compute="peft"``, peft's forward does the work: the batch's adapter becomes
    the layers' active one, and a mixed batch goes through peft's mixed-batch forward
    (``adapter_names``), passed by one permanent pre-forward hook per layer (peft's own
    ``adapter_names=`` path walks the model and adds and removes hooks on every call).
    """

    def __init__(self, model: torch.nn.Module, compute: Literal["fused", "peft"] = "fused") -> None:
        self.model = model
        self.compute = compute
        self._layers: list[Any] = []
        self._by_path: dict[str, Any] = {}
        self._hooked: set[int] = set()
        self._names: list[str] | None = None  # compute="peft", mixed batch: adapter per row
        # compute="fused": per layer (id) -> (A_cat.T, B_cat.T, row mask [B, 1, R] or scale)
        self._fused: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] | None = None
        self._fused_key: tuple[str, ...] | None = None
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
        uniform = all(a == first for a in adapters)
        if self.compute == "peft":
            self._names = None if uniform else adapters
            self._activate(None if not uniform or first == _BASE else first)
            return
        if uniform and first == _BASE:
            self._fused, self._fused_key = None, None
            return
        key = (first,) if uniform else tuple(adapters)
        if key == self._fused_key:
            return
        ids = tuple(sorted(set(adapters) - {_BASE}))
        stacks = self._stacks(ids)
        if uniform:
            self._fused = {lid: (a_t, b_t, float(scale[0])) for lid, (a_t, b_t, _, scale) in stacks.items()}
        else:
            slot = {aid: i for i, aid in enumerate(ids)}
            fused = {}
            rows: torch.Tensor | None = None
            for lid, (a_t, b_t, cols, scale) in stacks.items():
                if rows is None:
                    rows = torch.tensor([slot.get(a, -1) for a in adapters], device=a_t.device)
                mask = ((rows[:, None] == cols[None, :]) * scale).to(a_t.dtype)[:, None, :]
                fused[lid] = (a_t, b_t, mask)
            self._fused = fused
        self._fused_key = key

    def _stacks(self, ids: tuple[str, ...]) -> dict[int, tuple[torch.Tensor, ...]]:
        """Per layer: A.T of the adapters side by side [in, R], B.T [R, out], slot and scale per column."""
        cached = self._stack_cache.get(ids)
        if cached is not None:
            return cached
        out: dict[int, tuple[torch.Tensor, ...]] = {}
        for layer in self._layers:
            present = [(i, aid) for i, aid in enumerate(ids) if aid in layer.lora_A]
            if not present:
                continue
            if len(present) == 1:  # views, no copy
                a_t = layer.lora_A[present[0][1]].weight.t()
                b_t = layer.lora_B[present[0][1]].weight.t()
            else:
                a_t = torch.cat([layer.lora_A[aid].weight for _, aid in present], dim=0).t()
                b_t = torch.cat([layer.lora_B[aid].weight for _, aid in present], dim=1).t()
            cols = torch.cat([torch.full((layer.r[aid],), i, device=a_t.device) for i, aid in present])
            scale = torch.cat([torch.full((layer.r[aid],), float(layer.scaling[aid]), device=a_t.device)
                               for _, aid in present])
            out[id(layer)] = (a_t, b_t, cols, scale)
        if len(self._stack_cache) >= 8:  # bounded: an entry for several adapters copies their weights once
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
        self._fused, self._fused_key = None, None
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
        self._stack_cache, self._fused, self._fused_key = {}, None, None
        self._active = "?"
        self._activate(None)

    def _pre_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self._names is not None:
            kwargs["adapter_names"] = self._names
        return args, kwargs

    def _post_forward(self, module: Any, args: Any, kwargs: dict[str, Any], output: torch.Tensor) -> Any:
        fused = self._fused
        if fused is None:
            return None
        entry = fused.get(id(module))
        if entry is None:
            return None
        a_t, b_t, mask = entry
        x = args[0] if args else kwargs["x"]
        if x.dtype != a_t.dtype:
            x = x.to(a_t.dtype)
        out2 = output.view(-1, output.shape[-1])
        xa = torch.mm(x.reshape(-1, x.shape[-1]), a_t)
        if isinstance(mask, float):  # one adapter for the whole batch
            return out2.addmm_(xa, b_t, alpha=mask).view_as(output)
        # Rows on different adapters: keep each row's own block of columns, scaled.
        if x.dim() == 3 and x.shape[1] != 1:  # prefill: several positions per row
            xa = xa.view(mask.shape[0], -1, xa.shape[-1]).mul_(mask).view(-1, xa.shape[-1])
        else:
            xa.mul_(mask.view(mask.shape[0], -1))
        return out2.addmm_(xa, b_t).view_as(output)
