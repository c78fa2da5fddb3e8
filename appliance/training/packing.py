"""Sequence packing without attention across examples, and the loss over packed rows.

A micro-batch's examples are packed first-fit-decreasing into rows as wide as
its longest example, so rows carry little padding. Examples are never split.
Each example's ``position_ids`` restart at 0; with ``attention_mask=None``
transformers derives a block-diagonal causal mask from those restarts
(``masking_utils.find_packed_sequence_indices``), for eager and SDPA attention
alike, and flash-attention reads them as variable-length sequences. Targets
are shifted *per example* before packing, so no token learns to predict the
first token of its neighbour.

The loss projects only the hidden states that have a target through the
output head (:func:`linear_cross_entropy`), in chunks, computing the gradient
with respect to the hidden states during the forward pass: the full
``tokens x vocabulary`` logits are never held for backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from appliance.training.data import IGNORE_INDEX, Example

LOSS_CHUNK_TOKENS = 512


@dataclass
class PackedBatch:
    """Rows of packed examples.

    Attributes:
        input_ids: ``[rows, width]`` token ids, padded at the end of rows.
        position_ids: ``[rows, width]``, restarting at 0 for each example (and for the padding tail).
        targets: ``[rows, width]`` next-token targets, :data:`IGNORE_INDEX` where none.
        example_index: ``[rows, width]`` index into the packed examples, -1 on padding.
        n_tokens: Real (non-padding) tokens.
        n_targets: Positions with a target.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    example_index: torch.Tensor
    n_tokens: int
    n_targets: int

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            self.example_index.to(device),
            self.n_tokens,
            self.n_targets,
        )


def pack(examples: Sequence[Example], pad_id: int, width: int | None = None) -> PackedBatch:
    """Pack examples into as few rows of ``width`` tokens as first-fit-decreasing finds.

    Args:
        examples: Already truncated examples.
        pad_id: Token id for the padding tail of rows.
        width: Row width; defaults to the longest example.
    """
    width = width or max(len(e) for e in examples)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i])):
        size = len(examples[i])
        if size > width:
            raise ValueError(f"example of {size} tokens does not fit a row of {width}")
        for r, space in enumerate(free):
            if size <= space:
                rows[r].append(i)
                free[r] -= size
                break
        else:
            rows.append([i])
            free.append(width - size)

    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    targets = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    example_index = torch.full((n_rows, width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            ex = examples[i]
            n = len(ex)
            input_ids[r, col : col + n] = torch.tensor(ex.input_ids)
            position_ids[r, col : col + n] = torch.arange(n)
            targets[r, col : col + n - 1] = torch.tensor(ex.labels[1:])
            example_index[r, col : col + n] = i
            col += n
        # The padding tail gets its own position run, hence its own attention block.
        position_ids[r, col:] = torch.arange(width - col)
    n_tokens = sum(len(e) for e in examples)
    return PackedBatch(input_ids, position_ids, targets, example_index, n_tokens, int((targets != IGNORE_INDEX).sum()))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against targets, chunked.

    The output head is frozen in LoRA, so the only gradient needed is the one
    for ``hidden``: ``(softmax(logits) - onehot) @ weight``, computed chunk by
    chunk during the forward pass while the logits are at hand.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if needs_grad:
                probs = torch.exp(logits.sub_(lse[:, None]))
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden if needs_grad else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_output).to(grad_hidden.dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Sum of token cross-entropies for ``hidden [N, H]`` through a frozen head ``weight [V, H]``."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_cross_entropy needs a frozen output head (LoRA never trains lm_head)")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def packed_loss_sum(causal_lm: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Summed next-token loss of a packed batch (divide by the step's target count).

    ``causal_lm`` is the transformers model (with LoRA layers injected): its
    decoder runs on the packed rows, and only positions with a target go
    through the output head.
    """
    hidden = causal_lm.get_decoder()(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
    ).last_hidden_state
    mask = batch.targets != IGNORE_INDEX
    head = causal_lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("output heads with a bias are not supported")
    return linear_cross_entropy(hidden[mask], head.weight, batch.targets[mask])


def packed_token_losses(causal_lm: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target losses and the example each belongs to (for tests and diagnostics), no grad."""
    with torch.no_grad():
        hidden = causal_lm.get_decoder()(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        ).last_hidden_state
        mask = batch.targets != IGNORE_INDEX
        logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
        losses = torch.nn.functional.cross_entropy(logits, batch.targets[mask], reduction="none")
    return losses, batch.example_index[mask]
