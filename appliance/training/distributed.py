"""Data parallelism over a ``torch.distributed`` process group (Ray Train's ``TorchTrainer`` sets it up).

Two layouts of the model over the ranks:

* replicated (``ddp``): every rank holds the whole base model, and the
  adapter's gradients are summed by one flat all-reduce (below);
* sharded (``fsdp``, PyTorch's FSDP2 ``fully_shard``), for a base model too
  big to hold once per rank: each decoder layer's weights are split over the
  ranks and gathered only while the layer runs; the adapter's gradients are
  reduce-scattered by FSDP. Every forward is then a collective, so each rank
  runs the same number of forwards (:meth:`DataParallel.micro_batches`), and
  whatever reads whole weights (checkpoints, the adapter) gathers them with
  :func:`full` on every rank.

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

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from appliance.errors import InvalidRequestError
from appliance.training.hyperparameters import SHARDING
from appliance.training.memory import available_memory
from appliance.training.registry import capabilities

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group: ``rank`` of ``world`` ranks."""

    rank: int
    world: int
    device: torch.device
    sharded: bool = False  # FSDP: each rank holds 1/world of the base model's weights

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a step's batch (every ``world``-th item; may be empty)."""
        return list(items[self.rank :: self.world])

    @property
    def gradient_scale(self) -> float:
        """What a rank's loss is multiplied by so that the reduced gradients are the ranks' sum."""
        return float(self.world) if self.sharded else 1.0

    def micro_batches(self, items: Sequence[T], accumulation_steps: int) -> list[list[T]]:
        """This rank's share of a step split into micro-batches.

        Replicated, a rank runs as many as its share needs (none for an empty
        share). Sharded, every rank runs the same number, the most any rank
        needs, some of them empty: a forward is a collective there.
        """
        mine = self.shard(items)
        if not self.sharded:
            return micro_batches(mine, accumulation_steps)
        k = max(1, min(accumulation_steps, math.ceil(len(items) / self.world)))
        return _split(mine, k)

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


def micro_batches(items: Sequence[T], accumulation_steps: int) -> list[list[T]]:
    """``items`` in at most ``accumulation_steps`` consecutive micro-batches of equal size (the last may be short)."""
    if not items:
        return []
    return [chunk for chunk in _split(items, min(accumulation_steps, len(items))) if chunk]


def _split(items: Sequence[T], parts: int) -> list[list[T]]:
    """Exactly ``parts`` consecutive chunks of ``ceil(len / parts)`` items; trailing ones may be short or empty."""
    size = max(1, math.ceil(len(items) / parts))
    return [list(items[i * size : (i + 1) * size]) for i in range(parts)]


def current(device: torch.device) -> DataParallel | None:
    """The process group this process trains in, or None when it trains alone (no group, or a group of one).

    Args:
        device: Where this rank trains; collectives run there (NCCL needs CUDA tensors, gloo takes CPU ones).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    collective_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), collective_device)


#: Shard (``auto``) when one copy of the base model's weights would take more than this share of a rank's memory.
SHARD_ABOVE_MEMORY_SHARE = 0.5


def needs_sharding(model_dir: Path, device: torch.device, ranks_here: int = 1) -> bool:
    """Whether a copy of the base model per rank would crowd out training (``auto`` sharding picks FSDP then).

    A rank's memory is its GPU's, or on CPUs the host's available memory (or
    the process's data limit, if lower) split among the ``ranks_here``
    ranks on this host. The weights are the model's safetensors files.
    """
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = available_memory() // max(1, ranks_here)
    return weights > SHARD_ABOVE_MEMORY_SHARE * memory


def resolve_sharding(sharding: str, method: str, model_dir: Path, device: torch.device, world: int) -> bool:
    """Whether this data-parallel run shards the base model (``compute.sharding``, see :data:`SHARDING`)."""
    if sharding not in SHARDING:
        raise InvalidRequestError(
            f"`compute.sharding` must be one of {', '.join(map(repr, SHARDING))}; got {sharding!r}",
            param="compute.sharding")
    if not capabilities(method).supports_fsdp:
        if sharding == "fsdp":
            raise InvalidRequestError(f"`compute.sharding` 'fsdp' shards LoRA jobs only; got method {method!r}",
                                      param="compute.sharding")
        return False  # e.g. QLoRA: its 4-bit base is already a quarter of the size
    if sharding == "auto":
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return needs_sharding(model_dir, device, ranks_here)
    return sharding == "fsdp"


def shard_model(causal_lm: torch.nn.Module, dp: DataParallel, device: torch.device) -> int:
    """Shard ``causal_lm`` (adapter attached) over the ranks with FSDP2; return how many layers were wrapped.

    Each decoder layer (the model's ``_no_split_modules``), where nearly all
    the weights and every LoRA module are, is one unit, gathered for its
    forward and backward and freed after. The embeddings, final norm and
    output head stay whole on every rank: they are frozen, and the trainer
    runs the decoder and the head separately (a fused loss over the head's
    weight), which a sharded root would not gather for. FSDP averages the
    gradients over the ranks; the trainer wants their sum (each rank's loss
    is already divided by the whole step's target tokens), so it scales a
    sharded rank's loss by :attr:`DataParallel.gradient_scale` (gloo has no
    pre-multiplied sum to do it in the reduction).

    Raises:
        ValueError: The model names no decoder layer class to shard by.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dp.world,))
    unit_names = set(getattr(causal_lm, "_no_split_modules", None) or [])
    layers = [m for m in causal_lm.modules() if type(m).__name__ in unit_names]
    if not layers:
        raise ValueError(f"{type(causal_lm).__name__} names no decoder layers (_no_split_modules) to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder around the layers is the FSDP root, managing none of its own weights (the embeddings
    # and the final norm stay whole): with each layer its own root, FSDP would keep every layer gathered
    # after its forward (a root reshards only after backward), so an evaluation pass would end with the
    # whole decoder on every rank.
    decoder = causal_lm.get_decoder()
    whole = {p for p in decoder.parameters() if not any(p is q for layer in layers for q in layer.parameters())}
    fully_shard(decoder, mesh=mesh, ignored_params=whole)
    return len(layers)
