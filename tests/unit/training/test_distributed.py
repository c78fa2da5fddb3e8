"""Data-parallel training: two gloo ranks end with the weights one process gets, and only rank 0 reports.

Both layouts: the base model replicated on each rank, and sharded over them (FSDP), where a
rank with nothing to do in a step still runs the forwards the others run, and a checkpoint
made by gathering the shards resumes to the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load as load_safetensors

from appliance.training import train
from appliance.training.memorization import new_canaries
from appliance.training.distributed import needs_sharding

from .conftest import make_spec, reverse_records

# No dropout: its masks are the one thing that differs between one process and two ranks.
HP = {"n_epochs": 1, "batch_size": 5, "learning_rate": 1e-2, "lora_r": 4, "lora_dropout": 0.0,
      "checkpoint_every_steps": 2, "seed": 3}


def _rank(rank: int, world: int, model_dir: str, out: str, sharding: str = "auto", resume: str | None = None,
          canaries: tuple[str, ...] = ()) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        events, checkpoints = [], []

        def keep(step: int, blob: bytes) -> None:
            checkpoints.append(step)
            Path(out, f"checkpoint{step}").write_bytes(blob)

        result = train(make_spec("lora", **HP), Path(model_dir), reverse_records(21), reverse_records(6, seed=9),
                       on_event=events.append, on_checkpoint=keep, event_every_steps=1, sharding=sharding,
                       resume_from=Path(resume).read_bytes() if resume else None, canaries=canaries,
                       canary_repetitions=2)
        Path(out, f"rank{rank}.safetensors").write_bytes(result.adapter["adapter_model.safetensors"])
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "events": [e.type for e in events], "messages": [e.message for e in events], "checkpoints": checkpoints,
            "metrics": result.metrics.to_dict(), "details": result.details, "privacy": result.privacy,
        }))
    finally:
        dist.destroy_process_group()


def _assert_adapter(weights: bytes, alone) -> None:
    expected = load_safetensors(alone.adapter["adapter_model.safetensors"])
    got = load_safetensors(weights)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _assert_same_adapter(out: Path, alone) -> None:
    for rank in (0, 1):
        _assert_adapter((out / f"rank{rank}.safetensors").read_bytes(), alone)


@pytest.mark.slow
def test_two_ranks_train_the_same_adapter_as_one_process(tiny_model_dir, tmp_path):
    alone_events = []
    alone = train(make_spec("lora", **HP), tiny_model_dir, reverse_records(21), reverse_records(6, seed=9),
                  on_event=alone_events.append, event_every_steps=1)
    mp.spawn(_rank, args=(2, str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)

    _assert_same_adapter(tmp_path, alone)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Rank 0 reports what one process reports; rank 1 stays silent.
    assert first["events"] == [e.type for e in alone_events] and second["events"] == []
    assert first["checkpoints"] == [2, 4] and second["checkpoints"] == []
    for key in ("train_loss", "valid_loss_before", "valid_loss_after"):
        assert first["metrics"][key] == pytest.approx(getattr(alone.metrics, key), rel=1e-4)
    assert first["details"]["data_parallel"] == {"workers": 2, "sharding": "none"}  # auto: a tiny model fits
    assert first["metrics"]["trained_tokens"] == alone.metrics.trained_tokens
    assert first["metrics"]["steps"] == alone.metrics.steps == 5


@pytest.mark.slow
def test_fsdp_shards_the_base_model_and_trains_the_same_adapter_and_resumes(tiny_model_dir, tmp_path):
    canaries = tuple(new_canaries(2))  # their exposure is measured by generation-free scoring on every rank
    alone = train(make_spec("lora", **HP), tiny_model_dir, reverse_records(21), reverse_records(6, seed=9),
                  event_every_steps=1, canaries=canaries, canary_repetitions=2)
    # 21 examples in steps of 5: rank 1 gets two examples of a step's five, and in the last
    # step (one example) none, yet runs the forward rank 0 runs.
    first = tmp_path / "first"
    first.mkdir()
    mp.spawn(_rank, args=(2, str(tiny_model_dir), str(first), "fsdp", None, canaries), nprocs=2, join=True)
    _assert_same_adapter(first, alone)
    report = json.loads((first / "rank0.json").read_text())
    exposure = report["privacy"]["canaries"]["mean_exposure"]
    assert exposure == pytest.approx(alone.privacy["canaries"]["mean_exposure"], abs=1e-3)
    assert report["details"]["data_parallel"] == {"workers": 2, "sharding": "fsdp"}
    assert any("sharded over 2 workers (FSDP" in (m or "") for m in report["messages"])
    assert report["checkpoints"] == [2, 4]
    assert report["metrics"]["valid_loss_after"] == pytest.approx(alone.metrics.valid_loss_after, rel=1e-4)
    # The checkpoint holds whole tensors: it resumes sharded, and to the same adapter.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    mp.spawn(_rank, args=(2, str(tiny_model_dir), str(resumed), "fsdp", str(first / "checkpoint2"), canaries),
             nprocs=2, join=True)
    _assert_same_adapter(resumed, alone)
    # ...and in one process, unsharded.
    again = train(make_spec("lora", **HP), tiny_model_dir, reverse_records(21), reverse_records(6, seed=9),
                  resume_from=(first / "checkpoint4").read_bytes(), canaries=canaries, canary_repetitions=2)
    _assert_adapter(again.adapter["adapter_model.safetensors"], alone)


def test_auto_sharding_follows_the_weights_against_a_ranks_memory(tiny_model_dir):
    cpu = torch.device("cpu")
    assert not needs_sharding(tiny_model_dir, cpu)  # a few hundred KiB against the host's memory
    assert needs_sharding(tiny_model_dir, cpu, ranks_here=10**9)  # a share of a byte or so each
