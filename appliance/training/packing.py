"""Sequence packing without attention across examples, and the loss over packed rows.

A micro-batch's examples are concatenated into one row: no padding at all.
Each example's ``position_ids`` restart at 0 (so RoPE sees every example as if
alone), and the row's example boundaries travel to the attention function as
``packed_boundaries``. Models load with :data:`PACKED_ATTENTION`, which runs
causal SDPA per example: attention never crosses examples and no FLOP is spent
on masked-out blocks. Any other attention implementation (``sdpa``, ``eager``)
ignores ``packed_boundaries`` and still isolates the examples, because with
``attention_mask=None`` transformers derives a block-diagonal causal mask from
the position-id restarts (``masking_utils.find_packed_sequence_indices``):
that is how the benchmark baseline and the tests check the equivalence, and
what a GPU trains with (:func:`packed_attention`: FlashAttention varlen,
FlexAttention or SDPA, one kernel call per layer instead of a loop).
Targets are shifted *per example* before packing, so no token learns to
predict the first token of its neighbour.

The loss projects only the hidden states that have a target through the
output head (:func:`linear_cross_entropy`), in chunks, computing the gradient
with respect to the hidden states during the forward pass: the full
``tokens x vocabulary`` logits are never held for backward.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from appliance.training.data import IGNORE_INDEX, Example

LOSS_CHUNK_TOKENS = 512
#: Not named ``*sdpa*``: transformers would then refuse it for models without SDPA support (Gemma 2),
#: which this function serves all the same (it runs their soft-capped layers eagerly).
PACKED_ATTENTION = "appliance_packed"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_boundaries: Sequence[int] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA run separately on each packed example of a one-row batch.

    ``query`` is ``[1, heads, length, dim]``, ``key``/``value`` may have fewer
    (grouped-query) heads. ``packed_boundaries`` are the examples' start
    offsets plus the row length; without them the row is one sequence. A
    padding mask is not supported (packed rows have no padding).

    Custom attention gets no mask from transformers, so the layer's own
    variations are applied here: ``sliding_window`` (Mistral, Phi-3, Gemma's
    local layers; a query sees the ``sliding_window`` latest keys, itself
    included) and ``softcap`` (Gemma 2's ``tanh(scores / softcap) * softcap``
    before the softmax, which SDPA cannot do, so those layers run eagerly).
    """
    if attention_mask is not None:
        raise ValueError(f"{PACKED_ATTENTION} takes packed rows without an attention mask")
    length = query.shape[2]
    bounds = list(packed_boundaries) if packed_boundaries is not None else [0, length]
    if query.shape[0] != 1 and len(bounds) > 2:
        raise ValueError(f"{PACKED_ATTENTION} needs one packed row per batch; got {query.shape[0]}")
    gqa = key.shape[1] != query.shape[1]
    dropout = dropout if module.training else 0.0
    outputs = []
    for a, b in itertools.pairwise(bounds):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        windowed = sliding_window is not None and b - a > sliding_window
        if softcap is None and not windowed:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=b - a > 1, enable_gqa=gqa
            )
        else:
            out = _masked_attention(q, k, v, dropout, scaling, sliding_window if windowed else None, softcap)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scaling: float | None,
    sliding_window: int | None, softcap: float | None,
) -> torch.Tensor:
    """Causal attention over one example with a sliding window and/or soft-capped scores."""
    n = q.shape[2]
    i = torch.arange(n, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if sliding_window is not None:
        allowed &= i[:, None] - i[None, :] < sliding_window
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
    # As transformers' eager attention for Gemma 2: cap the scaled scores, mask, softmax in fp32.
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    return weights @ v


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


def packed_attention(device: torch.device, dtype: torch.dtype) -> str:
    """The attention implementation packed rows train with on ``device`` (``attn_implementation``).

    On a CPU, :data:`PACKED_ATTENTION`: one causal SDPA per example, the fastest there
    (``bench/train.py``). On a GPU that Python loop per example per layer would starve
    the device, so one kernel call per layer covers the whole row: FlashAttention-2's
    varlen kernel where ``flash-attn`` is installed (fp16/bf16 only), else PyTorch's
    FlexAttention with a document mask, else SDPA with a block-diagonal causal mask.
    transformers derives the documents from the position-id restarts in all three
    (``attention_mask=None``), so the loss equals the per-example path's.
    """
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    if device.type != "cuda":
        return PACKED_ATTENTION
    if dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available():
        return "flash_attention_2"
    if is_torch_flex_attn_available():
        return "flex_attention"
    return "sdpa"


@dataclass
class PackedBatch:
    """Examples packed into one row.

    Attributes:
        input_ids: ``[1, n_tokens]`` token ids.
        position_ids: ``[1, n_tokens]``, restarting at 0 for each example.
        targets: ``[1, n_tokens]`` next-token targets, :data:`IGNORE_INDEX` where none.
        example_index: ``[1, n_tokens]`` index of the example each token belongs to.
        boundaries: Start offset of each example, then ``n_tokens``.
        n_tokens: Tokens in the row (all real: there is no padding).
        n_targets: Positions with a target.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    example_index: torch.Tensor
    boundaries: tuple[int, ...]
    n_tokens: int
    n_targets: int

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            self.example_index.to(device),
            self.boundaries,
            self.n_tokens,
            self.n_targets,
        )


def pack(examples: Sequence[Example]) -> PackedBatch:
    """Concatenate examples into one row, positions restarting and targets shifted per example."""
    if not examples:
        raise ValueError("pack() needs at least one example")
    input_ids, positions, targets, owner, boundaries = [], [], [], [], [0]
    for i, ex in enumerate(examples):
        n = len(ex)
        input_ids.extend(ex.input_ids)
        positions.extend(range(n))
        targets.extend(ex.labels[1:])
        targets.append(IGNORE_INDEX)
        owner.extend([i] * n)
        boundaries.append(boundaries[-1] + n)
    target_tensor = torch.tensor([targets])
    return PackedBatch(
        input_ids=torch.tensor([input_ids]),
        position_ids=torch.tensor([positions]),
        targets=target_tensor,
        example_index=torch.tensor([owner]),
        boundaries=tuple(boundaries),
        n_tokens=len(input_ids),
        n_targets=int((target_tensor != IGNORE_INDEX).sum()),
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` (soft-capped if asked) against targets, chunked.

    The output head is frozen in LoRA, so the only gradient needed is the one
    for ``hidden``: ``(softmax(logits) - onehot) @ weight``, computed chunk by
    chunk during the forward pass while the logits are at hand. With a
    ``softcap``, ``logits = tanh(raw / softcap) * softcap`` and the gradient
    through the cap is ``1 - tanh(raw / softcap)**2``.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, softcap: float | None
    ) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            if softcap is not None:
                capped = logits.div_(softcap).tanh_()
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if needs_grad:
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if softcap is not None:
                    probs.mul_(capped.square_().neg_().add_(1.0))
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden if needs_grad else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_output).to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = LOSS_CHUNK_TOKENS,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies for ``hidden [N, H]`` through a frozen head ``weight [V, H]``.

    ``softcap`` caps the logits as Gemma 2 does (``tanh(logits / softcap) * softcap``).
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_cross_entropy needs a frozen output head (LoRA never trains lm_head)")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, softcap)


def output_head(causal_lm: torch.nn.Module) -> tuple[torch.Tensor, float | None]:
    """The output head's weight and the logit soft-cap the model applies after it (``None``: none).

    Raises:
        ValueError: The head has a bias (no supported architecture has one).
    """
    head = causal_lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("output heads with a bias are not supported")
    return head.weight, getattr(causal_lm.config, "final_logit_softcapping", None)


def packed_loss_sum(causal_lm: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Summed next-token loss of a packed batch (divide by the step's target count).

    ``causal_lm`` is the transformers model (with LoRA layers injected): its
    decoder runs on the packed rows, and only positions with a target go
    through the output head (and the model's logit soft-cap, if any).
    """
    hidden = _decode(causal_lm, batch)
    mask = batch.targets != IGNORE_INDEX
    weight, softcap = output_head(causal_lm)
    return linear_cross_entropy(hidden[mask], weight, batch.targets[mask], softcap=softcap)


def packed_token_losses(causal_lm: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target losses and the example each belongs to (for tests and diagnostics), no grad."""
    with torch.no_grad():
        hidden = _decode(causal_lm, batch)
        mask = batch.targets != IGNORE_INDEX
        _, softcap = output_head(causal_lm)
        logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        losses = torch.nn.functional.cross_entropy(logits, batch.targets[mask], reduction="none")
    return losses, batch.example_index[mask]


def _decode(causal_lm: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    return causal_lm.get_decoder()(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=None,
        use_cache=False,
        packed_boundaries=batch.boundaries,
    ).last_hidden_state
