import time

import pytest
from safetensors.torch import load as load_safetensors

from appliance.errors import InvalidRequestError
from appliance.training import checkpoint_adapter_files, train

from .conftest import make_spec, reverse_records

# 16 training examples, batch 4: 4 steps per epoch, 8 in all; dropout on, so RNG state matters.
HP = {"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-3, "lora_dropout": 0.1, "checkpoint_every_steps": 3,
      "gradient_accumulation_steps": 2, "warmup_ratio": 0.2, "weight_decay": 0.01}
TRAIN, VAL = reverse_records(16, seed=3), reverse_records(4, seed=4)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir):
    checkpoints = {}
    result = train(make_spec("lora", **HP), tiny_model_dir, TRAIN, VAL, on_checkpoint=checkpoints.__setitem__)
    return result, checkpoints


def test_checkpoints_come_every_n_steps_and_hold_an_adapter(uninterrupted):
    _, checkpoints = uninterrupted
    assert sorted(checkpoints) == [3, 6]  # not at the last step (8): the result holds that adapter
    files = checkpoint_adapter_files(checkpoints[3])
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("step", [3, 6], ids=["mid-epoch", "second-epoch"])
def test_resume_reaches_the_same_weights(uninterrupted, tiny_model_dir, step):
    full, checkpoints = uninterrupted
    resumed = train(make_spec("lora", **HP), tiny_model_dir, TRAIN, VAL, resume_from=checkpoints[step])
    assert resumed.status == "succeeded" and resumed.metrics.steps == 8
    a = load_safetensors(full.adapter["adapter_model.safetensors"])
    b = load_safetensors(resumed.adapter["adapter_model.safetensors"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert resumed.metrics.valid_loss_after == full.metrics.valid_loss_after
    assert resumed.metrics.valid_loss_before == full.metrics.valid_loss_before
    assert resumed.metrics.trained_tokens == full.metrics.trained_tokens


def test_resume_refuses_a_checkpoint_from_another_run(uninterrupted, tiny_model_dir):
    _, checkpoints = uninterrupted
    with pytest.raises(InvalidRequestError, match="different data") as info:
        train(make_spec("lora", **HP), tiny_model_dir, TRAIN[:-1], VAL, resume_from=checkpoints[3])
    assert info.value.param == "resume_from"
    with pytest.raises(InvalidRequestError, match="hyperparameters differ"):
        train(make_spec("lora", **{**HP, "lora_r": 4}), tiny_model_dir, TRAIN, VAL, resume_from=checkpoints[3])
    with pytest.raises(InvalidRequestError, match="not a readable training checkpoint"):
        train(make_spec("lora", **HP), tiny_model_dir, TRAIN, VAL, resume_from=b"garbage")


def test_should_stop_cancels_promptly(tiny_model_dir):
    events = []
    started = time.perf_counter()
    result = train(
        make_spec("lora", **HP), tiny_model_dir, TRAIN, VAL,
        on_event=events.append, event_every_steps=1,
        should_stop=lambda: any(e.type == "train" and e.step == 2 for e in events),
    )
    assert time.perf_counter() - started < 30
    assert result.status == "cancelled" and result.adapter is None
    assert result.metrics.steps == 2 and result.metrics.valid_loss_after is None
    assert result.metrics.valid_loss_before is not None
