"""The memory planner: a job's peak device memory, predicted from the model's shape, before it runs.

No torch import: the API process calls it when a job is created (to refuse a
job that cannot fit, naming the field and the alternative), the worker calls
it again once the data is tokenised and the device's free memory is known (to
choose the micro-batch and activation checkpointing). It models what *this*
trainer does, term by term (see :func:`estimate`):

* **weights** per rank: the base model in the training dtype (LoRA: bf16 on a
  GPU, fp32 on a CPU); QLoRA's decoder linears in NF4 with double
  quantisation (4.13 bits a weight) and everything else in fp32, as
  ``prepare_model_for_kbit_training`` leaves it; under FSDP each rank holds
  1/W of the decoder layers plus two gathered layers (the one computing and
  the one prefetched), and the embeddings and head whole.
* **adapter**: LoRA weights, gradients and AdamW's two moments, all fp32
  (16 bytes a parameter); DP-SGD adds per-example gradients.
* **activations** of one packed micro-batch of ``T`` tokens: what autograd
  keeps per token and layer (RMSNorm's fp32 input, the LoRA paths' fp32
  inputs and dropout masks, attention's q/k/v/output, the MLP's three
  intermediate tensors); with activation checkpointing, only each layer's
  input plus one layer's worth while it is recomputed.
* **loss**: the fused, chunked cross-entropy (``LOSS_CHUNK_TOKENS`` rows of
  logits at a time) and the hidden states' gradient it keeps.
* **runtime**: the CUDA context and allocator slack (a fixed allowance on a
  GPU; nothing on a CPU, where the measurement subtracts the process's
  footprint before loading).

Figures are checked against measured peaks at the sizes that run here
(``tests/training/test_planner_measured.py``, ``bench/RESULTS.md``) and against
published tables for 8B and 70B models (``tests/unit/training/test_planner.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import InvalidRequestError

GIB = 1 << 30
#: Tokens of logits the fused loss holds at once (``appliance.training.packing.LOSS_CHUNK_TOKENS``).
LOSS_CHUNK_TOKENS = 512
#: The most packed tokens a micro-batch is given: beyond it a step gets no faster, only larger.
MAX_MICRO_BATCH_TOKENS = 16384
#: A micro-batch this large keeps a GPU busy; a plan that reaches it needs no slower setting.
SATURATING_TOKENS = 4096
#: Share of the device's free memory a plan may use: the rest absorbs fragmentation and spikes.
MEMORY_MARGIN = 0.10
#: CUDA context, cuBLAS workspaces and the caching allocator's slack on a GPU.
CUDA_RUNTIME_BYTES = 1 * GIB
#: NF4 with double quantisation: 4 bits a weight, an 8-bit scale per 64 weights, an fp32 scale per 256 scales.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
#: AdamW on fp32 LoRA weights: the weight, its gradient and two moments.
ADAPTER_BYTES_PER_PARAM = 16

#: LoRA targets when a config names no known architecture: every projection of a Llama-like block.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only transformer's ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1
    experts_per_token: int = 1
    max_position_embeddings: int | None = None
    #: Gemma 2 soft-caps attention scores: the packed attention runs those layers eagerly (see
    #: ``appliance.training.packing``), keeping ``heads x length x length`` scores per example.
    attention_softcap: bool = False
    #: Gemma 2 soft-caps logits: the fused loss holds one more fp32 chunk of them.
    logit_softcap: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face ``config.json`` (llama, mistral, qwen2/3, gemma, phi3, mixtral shapes).

        Raises:
            InvalidRequestError: A field the planner needs is missing (``param`` is ``model``).
        """
        cfg = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"}) \
            if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping) else dict(config)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if not isinstance(cfg.get(k), int)]
        if missing:
            raise InvalidRequestError(f"the model's config.json lacks {', '.join(missing)}: its memory cannot be "
                                      "planned", param="model")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            attention_softcap=bool(cfg.get("attn_logit_softcapping")),
            logit_softcap=bool(cfg.get("final_logit_softcapping")),
        )

    # -- parameter counts -------------------------------------------------------------------------

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of a decoder linear layer named ``name``."""
        h, a, g, i = self.hidden_size, self.attn_width, self.kv_width, self.intermediate_size
        shapes = {"q_proj": (h, a), "k_proj": (h, g), "v_proj": (h, g), "o_proj": (a, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
                  "qkv_proj": (h, a + 2 * g), "gate_up_proj": (h, 2 * i), "dense": (a, h),
                  "fc1": (h, i), "fc2": (i, h), "w1": (h, i), "w3": (h, i), "w2": (i, h)}
        return shapes.get(name.rsplit(".", 1)[-1], (h, h))

    @property
    def layer_linear_params(self) -> int:
        h, a, g, i = self.hidden_size, self.attn_width, self.kv_width, self.intermediate_size
        return h * a + 2 * h * g + a * h + 3 * h * i * self.num_experts

    @property
    def layer_params(self) -> int:
        return self.layer_linear_params + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embeddings, the output head (unless tied) and the final norm."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def n_params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params

    def lora_params(self, rank: int, targets: Sequence[str]) -> int:
        per_layer = 0
        for name in targets:
            d_in, d_out = self.module_shape(name)
            copies = self.num_experts if name in ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3") else 1
            per_layer += rank * (d_in + d_out) * copies
        return per_layer * self.num_layers


@dataclass(frozen=True)
class JobShape:
    """The settings of a job that memory depends on.

    Attributes:
        method: ``lora`` or ``qlora``.
        rank: LoRA rank.
        targets: LoRA target module names.
        max_seq_length: The longest example, in tokens (a packed micro-batch holds whole examples).
        batch_size: Examples per optimizer step.
        precision: ``bf16`` or ``fp32`` (LoRA's base weights; QLoRA computes in bf16 on a GPU, fp32 on a CPU).
        lora_dropout: Above 0, each LoRA path keeps its own fp32 input and a mask.
        dp: DP-SGD (per-example gradients, no activation checkpointing).
        workers: Data-parallel ranks.
        fsdp: Whether the ranks shard the base model.
        checkpointing: Activation checkpointing: ``True``, ``False`` or ``None`` (the plan decides).
        micro_batch_examples: Examples per micro-batch when the job fixes it (an explicit
            ``gradient_accumulation_steps``); ``None``: the plan chooses the largest that fits.
    """

    method: str = "lora"
    rank: int = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS
    max_seq_length: int = 2048
    batch_size: int = 8
    precision: str = "bf16"
    lora_dropout: float = 0.05
    dp: bool = False
    workers: int = 1
    fsdp: bool | None = False
    checkpointing: bool | None = None
    micro_batch_examples: int | None = None


@dataclass(frozen=True)
class Device:
    """The memory one rank may use: ``free_bytes`` of a GPU (``cuda``) or of the host (``cpu``)."""

    kind: str
    free_bytes: int
    name: str = ""

    @property
    def budget(self) -> int:
        return int(self.free_bytes * (1 - MEMORY_MARGIN))


@dataclass(frozen=True)
class Estimate:
    """Predicted peak bytes of one rank, by term."""

    weights: int
    adapter: int
    activations: int
    loss: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.loss + self.runtime

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass(frozen=True)
class Plan:
    """The settings chosen for a job, and what they are predicted to need."""

    micro_batch_tokens: int
    examples_per_micro_batch: int
    gradient_accumulation_steps: int
    checkpointing: bool
    fsdp: bool
    estimate: Estimate
    device: Device

    def to_dict(self) -> dict[str, Any]:
        """The job's ``compute.plan``."""
        return {
            "predicted_peak_bytes": self.estimate.total,
            "predicted_peak_gib": round(self.estimate.total / GIB, 2),
            "breakdown_bytes": self.estimate.to_dict(),
            "micro_batch_tokens": self.micro_batch_tokens,
            "examples_per_micro_batch": self.examples_per_micro_batch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "activation_checkpointing": self.checkpointing,
            "sharding": "fsdp" if self.fsdp else "none",
            "device": {"kind": self.device.kind, "name": self.device.name, "free_bytes": self.device.free_bytes,
                       "budget_bytes": self.device.budget},
        }


def _dtype_bytes(job: JobShape, device_kind: str) -> int:
    """Bytes of one element of the base model's compute dtype."""
    if job.method == "qlora":
        return 2 if device_kind == "cuda" else 4
    return 2 if job.precision == "bf16" else 4


def _weights(shape: ModelShape, job: JobShape, b: int) -> int:
    layers = shape.num_layers
    if job.method == "qlora":
        linear = layers * shape.layer_linear_params
        rest = shape.n_params - linear
        return int(linear * NF4_BYTES_PER_WEIGHT + rest * 4)
    if job.fsdp and job.workers > 1:
        shards = layers * shape.layer_params * b / job.workers
        gathered = 2 * shape.layer_params * b  # the layer computing and the one prefetched
        return int(shards + gathered + shape.embedding_params * b)
    return shape.n_params * b


def _layer_activation_bytes(shape: ModelShape, job: JobShape, b: int, device_kind: str = "cuda") -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing).

    Checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on the demo model
    (bench/memory_plan.py's notes in bench/RESULTS.md): dropout keeps its mask as a bool on CUDA
    and in the input's dtype (fp32 for LoRA's paths) on a CPU.
    """
    mask = 1 if device_kind == "cuda" else 4
    h, a, g, i = shape.hidden_size, shape.attn_width, shape.kv_width, shape.intermediate_size
    experts = shape.experts_per_token
    total = 2 * 4 * h  # two RMSNorms keep their input in fp32
    total += b * (a + 2 * g) + 2 * b * a  # q, k, v after RoPE; attention output per example and joined
    total += 3 * b * i * experts  # SiLU's input and output, the up projection
    dropout = job.lora_dropout > 0
    inputs: dict[str, int] = {}
    for name in job.targets:
        d_in, _ = shape.module_shape(name)
        mlp = name in ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "w1", "w2", "w3")
        copies = experts if mlp else 1
        if dropout:
            total += d_in * (4 + mask) * copies  # the dropped-out fp32 input and its mask
        else:
            inputs[_input_of(name)] = d_in * 4 * copies  # shared by the projections reading one tensor
        total += 2 * job.rank * 4 * copies  # lora_A's output, kept for lora_B
    total += sum(inputs.values())
    if job.method == "qlora":  # bitsandbytes' 4-bit matmul keeps its input for the backward pass
        total += b * (h + a + h + i * experts)
    if shape.attention_softcap:
        # Eager attention per example (estimated, not measured): the scaled scores, their tanh, the
        # fp32 softmax and its cast, each heads x length per token of an example up to max_seq_length.
        total += shape.num_heads * job.max_seq_length * (3 * b + 4)
    return total


def _input_of(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    return {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "w1": "mlp_in",
            "w3": "mlp_in"}.get(leaf, leaf)


def estimate(shape: ModelShape, job: JobShape, device_kind: str, *, examples_per_micro_batch: int,
             checkpointing: bool) -> Estimate:
    """Peak bytes of one rank for a micro-batch of ``examples_per_micro_batch`` whole examples."""
    b = _dtype_bytes(job, device_kind)
    tokens = examples_per_micro_batch * job.max_seq_length
    h = shape.hidden_size
    lora = shape.lora_params(job.rank, job.targets)
    adapter = lora * ADAPTER_BYTES_PER_PARAM
    if job.dp:  # Opacus: one gradient per example, and their clipped sum
        adapter += 2 * examples_per_micro_batch * lora * 4
    per_layer = _layer_activation_bytes(shape, job, b, device_kind)
    if checkpointing:
        activations = tokens * (shape.num_layers * b * h + per_layer)
    else:
        activations = tokens * shape.num_layers * per_layer
    activations += tokens * (4 * h + 2 * b * h)  # embeddings out, the final norm's fp32 input, its output
    # The fused loss: one chunk of logits in fp32 and its probabilities (and, computing in bf16, the
    # probabilities cast back), and the hidden states' gradient it keeps for the whole micro-batch.
    chunk = min(LOSS_CHUNK_TOKENS, tokens)
    loss = chunk * shape.vocab_size * (8 + (b if b < 4 else 0) + (4 if shape.logit_softcap else 0)) + tokens * b * h
    runtime = CUDA_RUNTIME_BYTES if device_kind == "cuda" else 0
    return Estimate(weights=_weights(shape, job, b), adapter=int(adapter), activations=int(activations),
                    loss=int(loss), runtime=runtime)


def _options(job: JobShape) -> list[tuple[bool, bool]]:
    """``(checkpointing, fsdp)`` pairs the job allows, cheapest first."""
    ckpt = [job.checkpointing] if job.checkpointing is not None else [False, True]
    if job.dp:
        ckpt = [False]  # Opacus' per-example hooks cannot follow a recomputed forward
    if job.method == "qlora":
        ckpt = [True]  # the QLoRA recipe always checkpoints
    can_shard = job.method == "lora" and job.workers > 1
    shard = [bool(job.fsdp)] if job.fsdp is not None else ([False, True] if can_shard else [False])
    if not can_shard:
        shard = [False]
    return [(c, s) for s in shard for c in ckpt]


def _largest_fit(shape: ModelShape, job: JobShape, device: Device, checkpointing: bool) -> tuple[int, Estimate] | None:
    if job.micro_batch_examples is not None:
        fixed = estimate(shape, job, device.kind, examples_per_micro_batch=job.micro_batch_examples,
                         checkpointing=checkpointing)
        return (job.micro_batch_examples, fixed) if fixed.total <= device.budget else None
    per_rank = math.ceil(job.batch_size / max(1, job.workers))  # each rank takes its share of a step
    most = max(1, min(per_rank, MAX_MICRO_BATCH_TOKENS // job.max_seq_length))
    best = None
    lo, hi = 1, most
    while lo <= hi:  # memory grows with the micro-batch: bisect for the largest that fits
        mid = (lo + hi) // 2
        est = estimate(shape, job, device.kind, examples_per_micro_batch=mid, checkpointing=checkpointing)
        if est.total <= device.budget:
            best, lo = (mid, est), mid + 1
        else:
            hi = mid - 1
    return best


def plan(shape: ModelShape, job: JobShape, device: Device) -> Plan | None:
    """The cheapest settings that fit ``device``, or ``None`` if even the smallest plan does not.

    Cheapest: no activation checkpointing and no sharding when a micro-batch of
    :data:`SATURATING_TOKENS` (or the whole step) fits that way; otherwise the
    option that fits the largest micro-batch (checkpointing before sharding).
    """
    fits: list[Plan] = []
    for checkpointing, fsdp in _options(job):
        trial = dataclasses.replace(job, fsdp=fsdp)
        found = _largest_fit(shape, trial, device, checkpointing)
        if found is None:
            continue
        examples, est = found
        chosen = Plan(micro_batch_tokens=examples * job.max_seq_length, examples_per_micro_batch=examples,
                      gradient_accumulation_steps=math.ceil(math.ceil(job.batch_size / max(1, job.workers)) / examples),
                      checkpointing=checkpointing, fsdp=fsdp, estimate=est, device=device)
        if chosen.micro_batch_tokens >= min(SATURATING_TOKENS, job.batch_size * job.max_seq_length):
            return chosen
        fits.append(chosen)
    return max(fits, key=lambda p: p.micro_batch_tokens, default=None)


def alternatives(shape: ModelShape, job: JobShape, device: Device, *, max_workers: int = 8) -> list[str]:
    """What would make a job that does not fit ``device`` fit, as phrases for an error message."""
    out = []
    if job.method == "lora" and not job.dp:
        qlora = plan(shape, dataclasses.replace(job, method="qlora", fsdp=False, workers=1), device)
        if qlora is not None:
            out.append(f"method.type 'qlora' (predicted peak {qlora.estimate.total / GIB:.1f} GiB)")
    if job.method == "lora":
        for workers in range(max(2, job.workers + 1), max_workers + 1):
            sharded = plan(shape, dataclasses.replace(job, workers=workers, fsdp=True), device)
            if sharded is not None:
                out.append(f"compute.workers {workers} with compute.sharding 'fsdp' "
                           f"(predicted peak {sharded.estimate.total / GIB:.1f} GiB a worker)")
                break
    length = job.max_seq_length // 2
    while length >= 64:
        if plan(shape, dataclasses.replace(job, max_seq_length=length), device) is not None:
            out.append(f"method.{job.method}.hyperparameters.max_seq_length {length} or less")
            break
        length //= 2
    return out


def refuse(shape: ModelShape, job: JobShape, device: Device, *, field: str, max_workers: int = 8) -> InvalidRequestError:
    """The 400 for a job whose smallest plan does not fit: what it needs, what is free, what would fit."""
    smallest = estimate(shape, job, device.kind, examples_per_micro_batch=job.micro_batch_examples or 1,
                        checkpointing=job.method == "qlora" or (not job.dp and job.checkpointing is not False))
    options = alternatives(shape, job, device, max_workers=max_workers)
    hint = f"; it would fit with {' or '.join(options)}" if options else "; no setting of this appliance makes it fit"
    where = f"{device.name} ({device.kind})" if device.name else device.kind
    return InvalidRequestError(
        f"this job needs about {smallest.total / GIB:.1f} GiB per worker even with "
        f"{job.micro_batch_examples or 1} example(s) of {job.max_seq_length} tokens per micro-batch, but {where} has {device.budget / GIB:.1f} GiB to give "
        f"({device.free_bytes / GIB:.1f} GiB free less a {MEMORY_MARGIN:.0%} margin){hint}",
        param=field)
