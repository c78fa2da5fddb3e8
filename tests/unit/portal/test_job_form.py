"""The job form's mapping to the API's job object and of the validators' errors back onto its fields."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidRequestError
from appliance.jobs.memorization import parse_memorization
from appliance.jobs.recipes import validate_method
from appliance.portal.jobs import _field_errors, _job_body


def test_image_form_sends_only_what_was_set():
    body = _job_body({"model": "sd", "training_file": "file-1", "method": "dreambooth_lora", "max_train_steps": "12",
                      "learning_rate": "3e-3", "rank": "auto", "instance_prompt": " ", "class_prompt": "a dog",
                      "snr_gamma": "", "mixed_precision": "auto", "train_text_encoder": "on",
                      "validation_file": "file-2", "canaries": "3"}, "diffusion")
    assert body["method"] == {"type": "dreambooth_lora", "dreambooth_lora": {"hyperparameters": {
        "max_train_steps": 12, "learning_rate": 3e-3, "class_prompt": "a dog", "train_text_encoder": True}}}
    assert "validation_file" not in body and "memorization" not in body  # language-model options only
    from appliance.diffusion.compat import text_encoder_lora_supported

    if text_encoder_lora_supported()[0]:
        assert validate_method(body["method"], base_kind="diffusion")[0] == "dreambooth_lora"
    else:  # text-encoder LoRA this appliance cannot attach: refused at the field, the rest is valid
        with pytest.raises(InvalidRequestError) as info:
            validate_method(body["method"], base_kind="diffusion")
        assert info.value.param == "method.dreambooth_lora.hyperparameters.train_text_encoder"
        body["method"]["dreambooth_lora"]["hyperparameters"]["train_text_encoder"] = False
        assert validate_method(body["method"], base_kind="diffusion")[0] == "dreambooth_lora"


def test_llm_form_turns_dp_on_with_an_epsilon_and_sends_the_memorisation_option():
    form = {"model": "m", "training_file": "file-1", "method": "lora", "n_epochs": "2", "dp_epsilon": "8",
            "dp_delta": "auto", "dp_max_grad_norm": "0.5", "canaries": "2"}
    body = _job_body(form, "llm")
    assert body["method"]["lora"]["hyperparameters"] == {"n_epochs": 2, "dp": {"epsilon": 8, "max_grad_norm": 0.5}}
    assert body["memorization"] == {"canaries": 2, "extraction_probe": False}  # an unticked box is not sent
    assert parse_memorization(body["memorization"], base_kind="llm")["canaries"] == 2
    off = _job_body({**form, "dp_epsilon": "", "extraction_probe": "on"}, "llm")
    assert "dp" not in off["method"]["lora"]["hyperparameters"] and off["memorization"]["extraction_probe"]


@pytest.mark.parametrize(("kind", "method", "hp", "field", "text"), [
    ("diffusion", "dreambooth", {"max_train_steps": -3}, "max_train_steps", "max_train_steps must be a positive"),
    ("diffusion", "dreambooth", {"rank": 4}, "rank", "rank is not a known hyperparameter of 'dreambooth'"),
    ("llm", "lora", {"dp": {"epsilon": -1}}, "dp_epsilon", "dp.epsilon must be a number greater than 0"),
    ("llm", "qlora", {"dp": {"epsilon": 8}}, "dp_epsilon", "is not supported with QLoRA"),
])
def test_validator_errors_land_next_to_their_fields(kind, method, hp, field, text):
    with pytest.raises(InvalidRequestError) as info:
        validate_method({"type": method, method: {"hyperparameters": hp}}, base_kind=kind)
    errors = _field_errors(info.value, kind)
    assert text in errors[field], errors


def test_memorisation_and_unknown_params_are_placed():
    with pytest.raises(InvalidRequestError) as info:
        parse_memorization({"canaries": 40}, base_kind="llm")
    assert "memorization.canaries" in _field_errors(info.value, "llm")["canaries"]
    shown = _field_errors(InvalidRequestError("`compute.workers` must be 1", param="compute.workers"), "llm")
    assert shown == {"form": "`compute.workers` must be 1"}  # never lost for want of a field


def test_the_forms_ranges_are_the_servers():
    """What the browser checks (each field's min, max, whole numbers) is exactly what the API refuses."""
    from appliance.portal.jobs import FIELDS
    from appliance.trainkit.errors import HyperparameterError
    from appliance.training.hyperparameters import TrainingSpec

    def accepted(name: str, value) -> bool:
        try:
            TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": {name: value}}})
        except HyperparameterError as exc:
            assert any(p.endswith(name) for p, _ in exc.problems), exc.problems
            return False
        return True

    ranged = [f for f in FIELDS["llm"] if f.min is not None or f.max is not None]
    assert {f.name for f in ranged} >= {"n_epochs", "batch_size", "learning_rate", "lora_r", "lora_dropout",
                                        "max_seq_length", "warmup_ratio", "weight_decay"}
    for f in ranged:
        step = 1 if f.integer else 1e-6
        if f.min is not None:
            assert accepted(f.name, f.min + step if f.above else f.min) and not accepted(f.name, f.min - step)
            if f.above:
                assert not accepted(f.name, f.min)
        if f.max is not None:
            assert accepted(f.name, f.max) and not accepted(f.name, f.max + step), f.name
        if f.integer:
            assert not accepted(f.name, (f.min or 0) + 1.5), f.name


def test_canaries_stay_within_five_percent_of_the_training_examples():
    from appliance.jobs.memorization import fit_canaries, training_examples

    option = parse_memorization({"canaries": 4}, base_kind="llm")
    assert training_examples(22, has_validation_file=False) == 20 and training_examples(22, True) == 22
    # The default repetitions (10) shrink to fit: 4 canaries in 400 examples may take 20 records, 5 each.
    assert fit_canaries(option, 400, {"canaries": 4})["canary_repetitions"] == 5
    assert fit_canaries(option, 2000, {"canaries": 4})["canary_repetitions"] == 10  # the default, when it fits
    # The case: 4 canaries x 10 in a 22-record dataset is refused, naming the field and the fix.
    with pytest.raises(InvalidRequestError) as info:
        fit_canaries(option, training_examples(22, False), {"canaries": 4, "canary_repetitions": 10})
    assert info.value.param == "memorization.canaries"
    assert "5% of the 20 training examples" in info.value.message and "at least 80 examples" in info.value.message
    asked = parse_memorization({"canaries": 2, "canary_repetitions": 10}, base_kind="llm")
    with pytest.raises(InvalidRequestError) as info:
        fit_canaries(asked, 100, {"canaries": 2, "canary_repetitions": 10})
    assert info.value.param == "memorization.canary_repetitions" and "use at most 2" in info.value.message
    assert fit_canaries(parse_memorization({}, base_kind="llm"), 5, {}) == parse_memorization({}, base_kind="llm")


def test_canary_exposure_comes_with_a_verdict_in_plain_words():
    from appliance.portal.jobs import canary_verdict

    bits = 36.5  # log2 of the canary space
    assert canary_verdict(None, bits) is None
    assert canary_verdict({"mean_exposure": 1.2, "mean_exposure_base": 0.9, "max_exposure": 1.5}, bits).startswith(
        "No sign of memorisation")
    some = canary_verdict({"mean_exposure": 5.0, "mean_exposure_base": 1.0, "max_exposure": 6.0}, bits)
    assert some.startswith("Some memorisation") and "16x more likely" in some
    assert canary_verdict({"mean_exposure": 30.0, "mean_exposure_base": 1.0, "max_exposure": 33.0}, bits).startswith(
        "Memorised")


def test_class_images_go_with_the_dreambooth_methods_only():
    form = {"model": "sd", "training_file": "file-1", "class_images_file": "file-2", "class_prompt": "a dog"}
    assert _job_body({**form, "method": "dreambooth_lora"}, "diffusion")["class_images_file"] == "file-2"
    assert _job_body({**form, "method": "dreambooth"}, "diffusion")["class_images_file"] == "file-2"
    assert "class_images_file" not in _job_body({**form, "method": "lora"}, "diffusion")
    assert "class_images_file" not in _job_body({**form, "class_images_file": ""}, "diffusion")
    error = InvalidRequestError("`class_images_file` needs `method.dreambooth.hyperparameters.class_prompt`",
                                param="class_images_file")
    assert "class_images_file" in _field_errors(error, "diffusion")


def test_memory_options_go_as_booleans():
    form = {"model": "sd", "training_file": "file-1", "method": "dreambooth", "gradient_checkpointing": "on",
            "use_8bit_adam": "off", "mixed_precision": "bf16"}
    hp = _job_body(form, "diffusion")["method"]["dreambooth"]["hyperparameters"]
    assert hp["gradient_checkpointing"] is True and hp["use_8bit_adam"] is False and hp["mixed_precision"] == "bf16"
    assert "use_8bit_adam" not in _job_body({**form, "use_8bit_adam": "auto"}, "diffusion")["method"]["dreambooth"][
        "hyperparameters"]
    validate_method({"type": "dreambooth", "dreambooth": {"hyperparameters": hp}}, base_kind="diffusion", seed=0)


def test_durations_and_job_timing_read_as_a_person_would():
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from appliance.portal.jobs import duration, timing

    assert [duration(s) for s in (0, 45, 89.4, 90, 725, 3600, 3 * 3600 + 5 * 60 + 40)] == [
        "0 s", "45 s", "89 s", "2 min", "12 min", "1 h 00 min", "3 h 05 min"]
    now = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
    running = SimpleNamespace(status="running", started_at=now - timedelta(minutes=7), finished_at=None,
                              estimated_finish=now + timedelta(seconds=200))
    assert timing(running, now) == {"elapsed": "7 min", "eta": "about 3 min left"}
    late = SimpleNamespace(**{**vars(running), "estimated_finish": now - timedelta(seconds=5)})
    assert timing(late, now)["eta"] == "finishing"  # past the estimate: post-training phases
    done = SimpleNamespace(status="succeeded", started_at=now - timedelta(hours=2), finished_at=now - timedelta(hours=1),
                           estimated_finish=None)
    assert timing(done, now) == {"elapsed": "1 h 00 min", "eta": ""}
    queued = SimpleNamespace(status="queued", started_at=None, finished_at=None, estimated_finish=None)
    assert timing(queued, now) == {"elapsed": "", "eta": ""}
