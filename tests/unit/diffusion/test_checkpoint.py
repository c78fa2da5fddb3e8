"""Checkpoints resume to the same final weights; cancellation is prompt; foreign checkpoints are refused."""

import time

import pytest

from appliance.diffusion import checkpoint_artifacts, train_images
from appliance.errors import InvalidRequestError

from .conftest import disc_dataset, make_spec, same, tensors

# 6 steps, a checkpoint every 2; accumulation, Min-SNR and prior preservation on, so every piece of state matters.
HP = {"max_train_steps": 6, "train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 5e-3,
      "checkpoint_every_steps": 2, "validation_every_steps": 0, "snr_gamma": 5.0,
      "class_prompt": "a photo of a disc", "num_class_images": 2}
METHODS = {"dreambooth_lora": {**HP, "rank": 4}, "dreambooth": HP}


@pytest.fixture(scope="module", params=list(METHODS))
def uninterrupted(request, tiny_sd, discs):
    checkpoints = {}
    spec = make_spec(request.param, **METHODS[request.param])
    result = train_images(spec, tiny_sd, discs, on_checkpoint=checkpoints.__setitem__, sample_steps=2)
    return request.param, spec, result, checkpoints


def test_checkpoints_come_every_n_steps_and_hold_the_artifact(uninterrupted):
    method, _, result, checkpoints = uninterrupted
    assert sorted(checkpoints) == [2, 4]  # not at the last step (6): the result holds that artefact
    files = checkpoint_artifacts(checkpoints[4])
    assert set(files) == set(result.artifacts)
    assert not same(tensors(files), tensors(result))  # step 4's weights, not the final ones


@pytest.mark.parametrize("step", [2, 4])
def test_resume_reaches_the_same_weights(uninterrupted, tiny_sd, discs, step):
    method, spec, full, checkpoints = uninterrupted
    events = []
    resumed = train_images(spec, tiny_sd, discs, resume_from=checkpoints[step], on_event=events.append,
                           sample_steps=2, event_every_steps=1)
    assert resumed.status == "succeeded" and resumed.metrics.steps == 6
    assert [e.step for e in events if e.type == "train"] == list(range(step + 1, 7))
    assert same(tensors(resumed), tensors(full))
    assert resumed.metrics.train_loss == full.metrics.train_loss
    for name in ("color_histogram", "mean_color_distance"):
        before = f"subject_fidelity_proxy_{name}_before"
        after = f"subject_fidelity_proxy_{name}_after"
        assert getattr(resumed.metrics, before) == getattr(full.metrics, before)
        assert getattr(resumed.metrics, after) == getattr(full.metrics, after)
    assert resumed.images["before_after.png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_a_checkpoint_from_another_run(uninterrupted, tiny_sd, discs):
    method, spec, _, checkpoints = uninterrupted
    with pytest.raises(InvalidRequestError, match="different images or prompts") as info:
        train_images(spec, tiny_sd, disc_dataset(3), resume_from=checkpoints[2])
    assert info.value.param == "resume_from"
    with pytest.raises(InvalidRequestError, match="hyperparameters differ"):
        train_images(make_spec(method, **{**METHODS[method], "learning_rate": 1e-3}), tiny_sd, discs,
                     resume_from=checkpoints[2])
    other = "dreambooth" if method == "dreambooth_lora" else "dreambooth_lora"
    with pytest.raises(InvalidRequestError, match=f"made by method '{method}'"):
        train_images(make_spec(other, **METHODS[other]), tiny_sd, discs, resume_from=checkpoints[2])
    with pytest.raises(InvalidRequestError, match="not a readable image-training checkpoint"):
        train_images(spec, tiny_sd, discs, resume_from=b"garbage")


def test_should_stop_cancels_promptly(tiny_sd, discs):
    calls = []

    def stop() -> bool:
        calls.append(time.perf_counter())
        return len(calls) > 4  # two sampling batches (before), then two steps

    spec = make_spec("dreambooth", **{**HP, "max_train_steps": 1000, "checkpoint_every_steps": 0})
    started = time.perf_counter()
    result = train_images(spec, tiny_sd, discs, should_stop=stop, sample_steps=2)
    assert result.status == "cancelled" and result.artifacts is None
    assert 0 < result.metrics.steps < 5 and result.metrics.subject_fidelity_proxy_color_histogram_after is None
    assert result.metrics.subject_fidelity_proxy_color_histogram_before is not None
    assert "before_after.png" in result.images
    assert time.perf_counter() - started < 30


def test_a_full_dreambooth_checkpoint_streams_out_and_resumes(uninterrupted, tiny_sd, discs):
    """Issue 21: full DreamBooth's checkpoint (UNet and Adam state: ~10 GB at SD 1.5's size) is serialised into the
    stream the worker sends in chunks (``open_checkpoint``), never as one buffer: here the same bytes as the
    in-memory form, written piece by piece, and a run resumed from them ends on the same weights. That the stream
    holds its memory to a few chunks whatever the size, beyond 4 GiB too, is tests/unit/jobs/test_streams.py's."""
    import contextlib
    import io

    method, spec, full, checkpoints = uninterrupted
    if method != "dreambooth":
        pytest.skip("the full-weights method")
    writes: dict[int, list[int]] = {}
    streamed: dict[int, io.BytesIO] = {}

    class Recorder(io.BytesIO):
        def write(self, data) -> int:
            writes.setdefault(self.step, []).append(len(data))
            return super().write(data)

    def open_checkpoint(step: int):
        streamed[step] = Recorder()
        streamed[step].step = step
        return contextlib.nullcontext(streamed[step])

    train_images(spec, tiny_sd, discs, open_checkpoint=open_checkpoint, sample_steps=2)
    assert sorted(streamed) == [2, 4]
    assert streamed[4].getvalue() == checkpoints[4] and len(writes[4]) > 10  # piece by piece, the same bytes
    resumed = train_images(spec, tiny_sd, discs, resume_from=streamed[4].getvalue(), sample_steps=2)
    assert same(tensors(resumed), tensors(full))
