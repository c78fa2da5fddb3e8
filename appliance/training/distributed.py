"""Data parallelism over a ``torch.distributed`` process group (Ray Train's ``TorchTrainer`` sets it up).

Every rank holds the whole dataset and walks the same shuffled order; of each
step's batch a rank takes every ``world``-th example, and the ranks' gradients
are summed before the optimizer step. Each rank divides its loss by the
target-token count of the *whole* batch, so the sum is the gradient one
process computes on the whole batch: the maths of a step does not depend on
the number of workers (up to floating-point summation order and dropout
masks). Every rank therefore ends each step with the same weights; rank 0
reports events, checkpoints and the adapter.

The adapter's parameters are few, so the gradients travel as one flat
all-reduce per step rather than through ``DistributedDataParallel``'s hooks
(which need the forward pass to go through its wrapper and ``no_sync`` for
accumulation; the trainer calls the base model's forward directly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group: ``rank`` of ``world`` ranks."""

    rank: int
    world: int
    device: torch.device

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a step's batch (every ``world``-th item; may be empty)."""
        return list(items[self.rank :: self.world])

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (a rank with no examples adds zeros)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.detach().reshape(-1).to(self.device, torch.float32) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(device=g.device, dtype=g.dtype)
            offset += n

    def sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def agreed(self, predicate: Callable[[], bool]) -> Callable[[], bool]:
        """``predicate`` made collective: true on every rank as soon as it is true on one."""
        return lambda: self.any(predicate())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (cancellation reaches every rank at the same step)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def current(device: torch.device) -> DataParallel | None:
    """The process group this process trains in, or None when it trains alone (no group, or a group of one).

    Args:
        device: Where this rank trains; collectives run there (NCCL needs CUDA tensors, gloo takes CPU ones).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    collective_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), collective_device)
