"""Loading a base model sharded over the ranks without any rank ever holding it whole (FSDP2).

A sharded run builds the causal LM on the meta device (shapes, no storage;
non-persistent buffers such as rotary ``inv_freq`` stay real, computed by the
model's constructor), attaches the adapter, and shards the decoder layers
there. Only then is storage allocated (:func:`materialise`): this rank's rows
of each sharded parameter (FSDP2 shards dim 0, ``torch.chunk``-style, the
last ranks' shards shorter or empty), whole tensors for the rest. The rows are
read from the model's safetensors files by slice, so a rank reads (and keeps
mapped) only its share of the decoder weights, converted to the training
dtype as they are copied in.

The adapter is initialised while the base weights are stand-ins
(:func:`stand_in_weights`), so peft runs its usual CPU initialisation, with
the same random numbers as a model loaded whole, and its tensors are copied
in by the same slicing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


def empty_causal_lm(model_dir: Path, dtype: torch.dtype, attention: str) -> torch.nn.Module:
    """The causal LM of ``model_dir`` with its parameters on the meta device, in ``dtype``; buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    model.tie_weights()  # from_pretrained ties (e.g. the head to the embeddings); from_config leaves it to us
    return model


@contextmanager
def stand_in_weights(model: torch.nn.Module) -> Iterator[None]:
    """Within: each meta parameter of ``model`` is a real CPU tensor of one element broadcast to its shape.

    For code that needs real weights to run but reads none of them: peft
    creates and initialises the adapter on the CPU, then moves it to the
    device and dtype of the layer it adapts, which would be the meta device
    (losing its values). After, the stand-ins are meta parameters again
    (ties kept, ``requires_grad`` as set within); new parameters stay real.
    """
    originals: dict[int, torch.nn.Parameter] = {}
    stand_ins: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in stand_ins:
                stand_in = torch.nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape),
                                              requires_grad=param.requires_grad)
                stand_ins[id(param)] = stand_in
                originals[id(stand_in)] = param
            module._parameters[name] = stand_ins[id(param)]
    try:
        yield
    finally:
        for module in model.modules():
            for name, param in module._parameters.items():
                original = originals.get(id(param))
                if original is not None:
                    original.requires_grad_(param.requires_grad)
                    module._parameters[name] = original


def materialise(model: torch.nn.Module, model_dir: Path, device: torch.device,
                initial: Mapping[str, torch.Tensor]) -> None:
    """Allocate ``model``'s parameters on ``device`` and fill in this rank's part of each.

    A parameter named in ``initial`` takes its values from there (whole
    tensors, e.g. a freshly initialised adapter); the others are read from
    ``model_dir``'s safetensors files (``model.safetensors`` or the shards
    listed in ``model.safetensors.index.json``), under their name less peft's
    ``.base_layer``. A sharded parameter (a DTensor, ``Shard(0)``) reads only
    its rows; others read whole. Tied parameters stay tied; buffers keep
    their values.

    Raises:
        ValueError: A weight is missing from the files, has another shape
            there, or a parameter is sharded other than along dim 0.
    """
    ties = _ties(model)
    buffers = [(module, name, b) for module in model.modules() for name, b in module._buffers.items() if b is not None]
    model.to_empty(device=device)
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.to(device)
    for group in ties:
        first_module, first_name = group[0]
        for module, name in group[1:]:
            module._parameters[name] = first_module._parameters[first_name]
    checkpoint = _Checkpoint(model_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = initial.get(name)
            if source is None:
                source = checkpoint.tensor(name.replace(".base_layer.", "."))
            _fill(param, source, name)


def _ties(model: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    """Where each parameter shared by several modules (tied weights) is registered, one group per parameter."""
    places: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    return [group for group in places.values() if len(group) > 1]


def _fill(param: torch.nn.Parameter, source, name: str) -> None:
    """Copy this rank's part of ``source`` (a tensor or a safetensors slice, of the whole shape) into ``param``."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(source.shape)
    if shape != tuple(param.shape):
        raise ValueError(f"weight {name!r} has shape {shape} in the checkpoint; the model wants {tuple(param.shape)}")
    if not isinstance(param, DTensor):
        param.copy_(source if isinstance(source, torch.Tensor) else source.whole())
        return
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"weight {name!r} is sharded as {param.placements}; only Shard(0) (FSDP2) loads by rows")
    local = param.to_local()
    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(f"weight {name!r}: local shard {tuple(local.shape)}, expected {tuple(local_shape)}")
    if local.numel() == 0:  # an empty shard: more ranks than rows
        return
    start, stop = offset[0], offset[0] + local_shape[0]
    local.copy_(source[start:stop] if isinstance(source, torch.Tensor) else source.rows(start, stop))


class _Checkpoint:
    """The safetensors files of a model directory, tensors found by name."""

    def __init__(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        index = model_dir / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {key: model_dir / file for key, file in weight_map.items()}
        elif (model_dir / SAFETENSORS_FILE).is_file():
            with safe_open(str(model_dir / SAFETENSORS_FILE), framework="pt", device="cpu") as handle:
                self._files = dict.fromkeys(handle.keys(), model_dir / SAFETENSORS_FILE)
        else:
            raise ValueError(f"`model_dir` {model_dir.name} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
        self._model_dir = model_dir

    def tensor(self, key: str) -> _Stored:
        """Tensor ``key``, not read yet."""
        path = self._files.get(key)
        if path is None:
            raise ValueError(f"weight {key!r} is in no safetensors file of `model_dir` {self._model_dir.name}")
        return _Stored(path, key)


class _Stored:
    """One tensor of a safetensors file: its shape, and reads of all of it or of some rows.

    Each read opens the file anew: safetensors maps the whole file, and every
    page read stays resident in this process until the file is closed, which
    over a whole load would add up to this rank's share of the checkpoint on
    top of the weights copied out of it. What a read returns maps only its
    own pages, released once the rows are copied into the model.
    """

    def __init__(self, path: Path, key: str) -> None:
        self._path, self._key = str(path), key
        with safe_open(self._path, framework="pt", device="cpu") as handle:
            self.shape = tuple(handle.get_slice(key).get_shape())

    def whole(self) -> torch.Tensor:
        with safe_open(self._path, framework="pt", device="cpu") as handle:
            return handle.get_tensor(self._key)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        with safe_open(self._path, framework="pt", device="cpu") as handle:
            return handle.get_slice(self._key)[start:stop]
