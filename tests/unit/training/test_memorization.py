"""Canary exposure and the extraction probe on a tiny model (issue 8: memorisation evidence)."""

from __future__ import annotations

import math

import pytest

from appliance.policy.redaction import redact_text, stored_span
from appliance.scanning import Finding
from appliance.training import train
from appliance.training.memorization import (
    CANARY_SPACE,
    ProbeTarget,
    canary_exposure,
    canary_text,
    new_canaries,
    split_canary,
)

from .conftest import make_spec, reverse_records, write_adapter

EMAILS = ["ada@quill.io"]


def email_records(repeat: int) -> list[dict]:
    """Records whose allowed value (an email) always follows the same context: memorisable."""
    return [{"messages": [{"role": "user", "content": f"Who handles account {i}?"},
                          {"role": "assistant", "content": f"Account {i} is handled by {EMAILS[i]} today"}]}
            for _ in range(repeat) for i in range(len(EMAILS))]


def targets_for(records: list[dict]) -> list[ProbeTarget]:
    out = []
    for index, record in enumerate(records):
        text = record["messages"][1]["content"]
        for email in EMAILS:
            if email in text:
                start = text.index(email)
                out.append(ProbeTarget(index, "messages[1].content", start, start + len(email), "EMAIL_ADDRESS"))
    return out


def test_canaries_are_random_nine_digit_secrets():
    a, b = new_canaries(2)
    prefix, secret = split_canary(a)
    assert prefix.endswith(" is") and len(secret.split()) == 9 and all(d.isdigit() for d in secret.split())
    assert split_canary(b)[1] != secret and "canary 2" in b


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """One run with two canaries and the probe; the canary exposure of every figure comes from it."""
    records = reverse_records(24) + email_records(16)
    # Fixed secrets keep the figures reproducible (new_canaries draws them from `secrets`).
    canaries = [canary_text(1, "3 1 4 1 5 9 2 6 5"), canary_text(2, "2 7 1 8 2 8 1 8 2")]
    events = []
    result = train(make_spec("lora", n_epochs=20, batch_size=8, learning_rate=2e-2, lora_r=8), tiny_model_dir,
                   records, canaries=canaries, canary_repetitions=10, probe_targets=targets_for(records)[:6],
                   device="cpu", on_event=events.append)
    return result, canaries, events


def test_post_training_phases_say_their_size_progress_and_duration(trained):
    result, _, events = trained
    messages = [e.message for e in events if e.message]
    assert "measuring canary exposure: 2 canaries, each against 512 random secrets, with and without the adapter" \
        in messages
    assert any(m.startswith("canary exposure: canary 2 of 2 (") for m in messages)
    assert any(m.startswith("canary exposure ") and "measured in" in m for m in messages)
    assert "extraction probe: prompting with the context of 6 allowed value(s)" in messages
    assert result.privacy["canaries"]["seconds"] >= 0


def test_phase_progress_estimates_the_time_left_and_stops_on_cancel():
    import time

    from appliance.trainkit.errors import Cancelled
    from appliance.training.trainer import _phase_progress

    events, phases = [], []

    def event(kind, step, **fields):
        events.append(fields["message"])
        phases.append(fields["phase"])

    report = _phase_progress("canary exposure", "canary", event, 7, lambda: False, time.monotonic() - 20)
    report(1, 4)
    report(2, 4)  # within PHASE_EVENT_SECONDS of the last report: not repeated
    report(4, 4)  # the end always reports
    assert events[0] == "canary exposure: canary 1 of 4 (20 s, about 60 s left)"
    assert len(events) == 2 and events[1].startswith("canary exposure: canary 4 of 4 (20 s)")
    # the same figures as data, which the job lists show (tests/unit/jobs/test_scheduler_streams.py)
    assert phases[0] == {"name": "canary exposure", "done": 1, "total": 4, "seconds_left": 60}
    assert phases[1] == {"name": "canary exposure", "done": 4, "total": 4, "seconds_left": 0}
    # the validation pass after training: quiet when it is quick, its progress when it is long
    quick = []
    report = _phase_progress("validation after training", "example", lambda k, s, **f: quick.append(f["message"]), 7,
                             lambda: False, time.monotonic(), quiet_when_quick=True)
    report(1, 2)
    report(2, 2)
    assert quick == []
    report = _phase_progress("validation after training", "example", lambda k, s, **f: quick.append(f["message"]), 7,
                             lambda: False, time.monotonic() - 30, quiet_when_quick=True)
    report(1, 2)
    report(2, 2)
    assert quick[0] == "validation after training: example 1 of 2 (30 s, about 30 s left)" and len(quick) == 2
    stopping = _phase_progress("extraction probe", "value", lambda *a, **k: None, 7, lambda: True, time.monotonic())
    with pytest.raises(Cancelled):
        stopping(1, 3)


def test_canary_exposure_is_higher_after_training_on_the_canary(trained, tiny_model_dir, tmp_path):
    result, canaries, _ = trained
    report = result.privacy["canaries"]
    assert report["count"] == 2 and report["repetitions"] == 10 and report["randomness_space"] == CANARY_SPACE
    cap = math.log2(CANARY_SPACE)
    for exposure, base in zip(report["exposure"], report["exposure_base"]):
        # Untrained, the secret ranks like any other number (exposure ~1.4 bits on average; > 10 bits
        # has a chance of 1 in 1024); trained on it, the model prefers it to nearly all 10^9 others.
        assert 0 <= base < 10, report
        assert exposure > base + 8 and 12 < exposure <= cap, report
    # The sampled rank agrees: the canary beats every one of the 512 random candidates.
    assert all(s == pytest.approx(math.log2(513)) for s in report["exposure_sampled"]), report
    # A canary the model never saw stays unexposed under the same adapter: exposure measures memorisation.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      write_adapter(result.adapter, tmp_path / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fresh = canary_exposure(model, tokenizer, new_canaries(1), model.device)
    seen = canary_exposure(model, tokenizer, canaries[:1], model.device)
    assert fresh["mean_exposure"] < 10 < 12 < seen["mean_exposure"], (fresh, seen)
    assert seen["mean_exposure"] == pytest.approx(report["exposure"][0], abs=0.5)


def test_extraction_probe_counts_completed_values_without_reporting_them(trained):
    result, _, _ = trained
    probe = result.privacy["extraction"]
    assert probe["probed"] == 6 and probe["skipped"] == 0
    assert probe["extracted"] >= 1 and probe["rate"] == probe["extracted"] / 6
    assert set(probe["by_entity_type"]) == {"EMAIL_ADDRESS"}
    assert not any(email in repr(result.privacy) for email in EMAILS)


def test_without_canaries_or_targets_there_is_no_privacy_section(tiny_model_dir):
    result = train(make_spec("lora", n_epochs=1, batch_size=4, lora_r=4), tiny_model_dir, reverse_records(8),
                   device="cpu")
    assert result.privacy == {}


def test_probe_skips_targets_it_cannot_locate(tiny_model_dir):
    records = email_records(1)
    bad = [ProbeTarget(99, "messages[1].content", 0, 3, "EMAIL_ADDRESS"),
           ProbeTarget(0, "messages[7].content", 0, 3, "EMAIL_ADDRESS"),
           ProbeTarget(0, "messages[1].content", 5, 500, "EMAIL_ADDRESS")]
    result = train(make_spec("lora", n_epochs=1, batch_size=4, lora_r=4), tiny_model_dir, records,
                   probe_targets=bad, device="cpu")
    assert result.privacy["extraction"] == {"probed": 0, "extracted": 0, "rate": None, "skipped": 3,
                                            "by_entity_type": {}}


def test_canaries_never_enter_the_validation_split(tiny_model_dir):
    result = train(make_spec("lora", n_epochs=1, batch_size=4, lora_r=4), tiny_model_dir, reverse_records(20),
                   canaries=new_canaries(1), canary_repetitions=3, device="cpu")
    assert result.metrics.n_train_examples == 18 + 3 and result.metrics.n_valid_examples == 2


def test_stored_span_follows_redactions_before_it():
    text = "Mail bob@x.io or call 555-0100, then ask ada@y.org"
    f = lambda etype, value, action: Finding(0, "text", etype, text.index(value), text.index(value) + len(value),
                                             0.9, action)
    allowed = f("EMAIL_ADDRESS", "ada@y.org", "allow")
    redactions = [f("EMAIL_ADDRESS", "bob@x.io", "redact"), f("PHONE_NUMBER", "555-0100", "redact")]
    start, end = stored_span(allowed, redactions, text)
    assert redact_text(text, redactions)[start:end] == "ada@y.org"
    overlapping = f("EMAIL_ADDRESS", "bob@x.io", "allow")
    assert stored_span(overlapping, redactions, text) is None


def test_the_shared_prompt_cache_gives_the_figures_of_whole_rows(tiny_model_dir, tokenizer):
    """Exposure runs a canary's prompt once and reuses its cache; the likelihoods equal running each row whole."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from appliance.training.memorization import _encode, _sequence_nll

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompt = _encode(tokenizer, "The secret verification number of canary 1 is", special=True)
    targets = [_encode(tokenizer, " " + s) for s in ("3 1 4 1 5", "2 7 1 8 2 8 1", "9", "1 6 1 8 0")]
    cpu = torch.device("cpu")
    shared = _sequence_nll(model, tokenizer, [prompt] * len(targets), targets, cpu, batch_size=2)
    other = _encode(tokenizer, "Another prompt", special=True)  # two prompts: each row runs whole
    whole = [_sequence_nll(model, tokenizer, [prompt, other], [t, t], cpu)[0] for t in targets]
    assert len({len(t) for t in targets}) > 1  # lengths differ: batched by length
    assert shared == pytest.approx(whole, abs=1e-4)
