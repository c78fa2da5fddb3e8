"""A hyperparameter search over real training runs on the tiny model: the Optuna study of
:mod:`appliance.jobs.search` proposes each trial, the trainer's per-epoch validation losses feed its pruner,
and a pruned trial stops through ``should_stop`` as a cancelled job does.

In the appliance each trial is a job in its own sandboxed worker; here the trainer runs in-process, which is
what the worker calls.
"""

from __future__ import annotations

import pytest

from appliance.jobs.search import SearchStudy, parse_search
from appliance.training import train
from appliance.training.hyperparameters import HYPERPARAMETERS

from .conftest import make_spec, reverse_records

EPOCHS = 3
#: {"max_seq_length": 64} keeps each trial to seconds on two shared cores


def test_a_search_of_four_trials_on_the_tiny_model_publishes_the_least_validation_loss(tiny_model_dir):
    spec = parse_search("lora", {
        "learning_rate": {"range": [1e-4, 3e-2], "scale": "log"}, "lora_r": {"choice": [4, 8]},
        "n_epochs": EPOCHS, "batch_size": 8, "checkpoint_every_steps": 0, "max_seq_length": 64,
    }, {"trials": 4, "max_seconds": 600, "sampler": "random", "early_stopping": "median"},
        lambda values: HYPERPARAMETERS["lora"](**values))
    study = SearchStudy(spec, seed=11)
    train_records, val_records = reverse_records(16), reverse_records(4, seed=9)
    results, validation_steps = {}, {}
    while (proposal := study.ask()) is not None:
        stop = []

        def on_event(event, number=proposal.number, stop=stop):
            if event.type == "validation":
                validation_steps.setdefault(number, []).append(event.epoch)
            if event.type == "validation" and 0 < event.step < event.total_steps and study.report(
                    number, round(event.epoch), event.valid_loss):
                stop.append(True)

        result = train(make_spec("lora", **spec.trial_hyperparameters(proposal.params)), tiny_model_dir,
                       train_records, val_records, on_event=on_event, should_stop=lambda stop=stop: bool(stop),
                       validate_every_epoch=True)
        if result.status == "cancelled":
            study.tell(proposal.number, "pruned")
        else:
            study.tell(proposal.number, "complete", result.metrics.valid_loss_after)
            results[proposal.number] = result

    assert len(study.records) == 4 and study.finished()
    complete = {n: r for n, r in study.records.items() if r.state == "complete"}
    assert len(complete) >= 2  # the pruner waits for two finished trials before it stops any
    best = study.best()
    assert best.value == min(r.value for r in complete.values())
    assert best.value == min(r.metrics.valid_loss_after for r in results.values())
    assert results[best.number].hyperparameters.learning_rate == pytest.approx(best.params["learning_rate"])
    for number, record in study.records.items():  # before training, after each epoch but the last, after training
        if record.state == "complete":
            assert validation_steps[number] == [0.0, 1.0, 2.0, 3.0] and sorted(record.reports) == [1, 2]
            assert results[number].hyperparameters.lora_r == record.params["lora_r"]
        else:  # stopped at the report the pruner judged worse than the median: no validation after training
            assert record.state == "pruned" and validation_steps[number] == [0.0, *sorted(record.reports)]
    assert "pruned" in [r.state for r in study.records.values()]  # the smallest learning rate lags from epoch 1
