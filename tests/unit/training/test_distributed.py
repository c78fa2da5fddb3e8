"""Data-parallel training: two gloo ranks end with the weights one process gets, and only rank 0 reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load as load_safetensors

from appliance.training import train

from .conftest import make_spec, reverse_records

# No dropout: its masks are the one thing that differs between one process and two ranks.
HP = {"n_epochs": 1, "batch_size": 5, "learning_rate": 1e-2, "lora_r": 4, "lora_dropout": 0.0,
      "checkpoint_every_steps": 2, "seed": 3}


def _rank(rank: int, world: int, model_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        events, checkpoints = [], []
        result = train(make_spec("lora", **HP), Path(model_dir), reverse_records(21), reverse_records(6, seed=9),
                       on_event=events.append, on_checkpoint=lambda step, blob: checkpoints.append(step),
                       event_every_steps=1)
        Path(out, f"rank{rank}.safetensors").write_bytes(result.adapter["adapter_model.safetensors"])
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "events": [e.type for e in events], "checkpoints": checkpoints,
            "metrics": result.metrics.to_dict(),
        }))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_the_same_adapter_as_one_process(tiny_model_dir, tmp_path):
    alone_events = []
    alone = train(make_spec("lora", **HP), tiny_model_dir, reverse_records(21), reverse_records(6, seed=9),
                  on_event=alone_events.append, event_every_steps=1)
    mp.spawn(_rank, args=(2, str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)

    expected = load_safetensors(alone.adapter["adapter_model.safetensors"])
    for rank in (0, 1):
        got = load_safetensors((tmp_path / f"rank{rank}.safetensors").read_bytes())
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Rank 0 reports what one process reports; rank 1 stays silent.
    assert first["events"] == [e.type for e in alone_events] and second["events"] == []
    assert first["checkpoints"] == [2, 4] and second["checkpoints"] == []
    for key in ("train_loss", "valid_loss_before", "valid_loss_after"):
        assert first["metrics"][key] == pytest.approx(getattr(alone.metrics, key), rel=1e-4)
    assert first["metrics"]["trained_tokens"] == alone.metrics.trained_tokens
    assert first["metrics"]["steps"] == alone.metrics.steps == 5
