"""Hyperparameter search: the space and budget as a job states them, and the Optuna study driven by ask-and-tell.

Trials here are a scripted stand-in for a job (a validation loss per epoch from the trial's values); the study is
the real Optuna one the control plane drives.
"""

from __future__ import annotations

import math

import pytest

from appliance.errors import InvalidFieldsError
from appliance.jobs.search import SearchStudy, TrialRecord, parse_search, parse_search_method, stored
from appliance.jobs.search import spec_of as spec_of_column
from appliance.training.hyperparameters import HYPERPARAMETERS

SPACE = {"learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}, "lora_r": {"choice": [8, 16]}, "n_epochs": 3}


def lora(values):
    return HYPERPARAMETERS["lora"](**values)


def spec_of(hyperparameters=None, search=None, method="lora"):
    return parse_search(method, SPACE if hyperparameters is None else hyperparameters,
                        {"trials": 4, "max_seconds": 600} if search is None else search, lora)


def losses(params, epochs=3):
    """A trial's validation loss at the end of each epoch: best near lr 1e-3, a little better with rank 16."""
    gap = abs(math.log10(params["learning_rate"]) + 3) + (0.1 if params["lora_r"] == 8 else 0.0)
    return [1.0 + gap + 1.0 / (epoch + 1) for epoch in range(epochs)]


def run(study, trial_losses=losses):
    """Run trials one after another until the budget ends, as the control plane does with jobs."""
    while (proposal := study.ask()) is not None:
        for epoch, loss in enumerate(trial_losses(proposal.params)):
            if study.report(proposal.number, epoch, loss):
                study.tell(proposal.number, "pruned")
                break
        else:
            study.tell(proposal.number, "complete", loss)
    return study


def test_space_and_budget_are_parsed_and_stated():
    spec = spec_of()
    assert spec.fixed == {"n_epochs": 3}
    assert spec.to_dict() == {
        "space": {"learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}, "lora_r": {"choice": [8, 16]}},
        "trials": 4, "max_seconds": 600, "sampler": "tpe", "early_stopping": "median"}
    assert spec.trial_hyperparameters({"learning_rate": 1e-3, "lora_r": 8}) == {
        "n_epochs": 3, "learning_rate": 1e-3, "lora_r": 8}


def test_every_problem_is_reported_at_once_naming_field_and_value():
    with pytest.raises(InvalidFieldsError) as err:
        spec_of({"learning_rate": {"range": [1e-2, 1e-4]}, "lora_r": {"choice": [8, "x"]},
                 "max_seq_length": {"choice": [128, 256]}, "weight_decay": {"range": [0, 1], "scale": "log"}},
                {"max_seconds": 5, "sampler": "bayes", "workers": 2})
    problems = dict(err.value.problems)
    at = "method.lora.hyperparameters"
    assert "low must be below high; got [0.01, 0.0001]" in problems[f"{at}.learning_rate.range"]
    assert "must be an integer; got 'x'" in problems[f"{at}.lora_r.choice[1]"]
    assert "cannot be searched" in problems[f"{at}.max_seq_length"]
    assert "log scale needs low above 0" in problems[f"{at}.weight_decay.range"]
    assert "got 5" in problems["search.max_seconds"]
    assert "got 'bayes'" in problems["search.sampler"]
    assert "is not a search option" in problems["search.workers"]
    assert "is required" in problems["search.trials"]


def test_values_no_job_could_take_are_refused_with_the_recipes_own_rules():
    with pytest.raises(InvalidFieldsError) as err:
        spec_of({"lora_r": {"choice": [8, 512]}, "lora_dropout": {"range": [0.0, 0.9]},
                 "batch_size": {"choice": [2, 8]}, "gradient_accumulation_steps": 4})
    problems = dict(err.value.problems)
    at = "method.lora.hyperparameters"
    assert "got 512" in problems[f"{at}.lora_r.choice[1]"]
    assert "got 0.9" in problems[f"{at}.lora_dropout.range[1]"]
    assert "must not exceed batch_size (2)" in problems[f"{at}.gradient_accumulation_steps"]


def test_a_misspelt_name_or_a_list_among_choices_is_a_problem_naming_it_not_a_crash():
    """Both reached the constructor or set() before (a TypeError: a 500 through the API)."""
    for hyperparameters, field, said in (
            ({**SPACE, "lora_rank": 8}, "lora_rank", "is not a known hyperparameter; known: "),
            ({"lora_r": {"choice": [[8], [16]]}}, "lora_r.choice[0]", "must be an integer; got [8]")):
        with pytest.raises(InvalidFieldsError) as err:
            parse_search_method({"type": "lora", "lora": {"hyperparameters": hyperparameters}},
                                {"trials": 2, "max_seconds": 600})
        assert said in dict(err.value.problems)[f"method.lora.hyperparameters.{field}"], err.value.problems


def test_with_n_epochs_searched_trials_are_not_stopped_by_comparing_epochs():
    """Trials of 2 and 6 epochs are at different points of their schedules at epoch 1."""
    space = {"n_epochs": {"choice": [2, 6]}, "learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}}
    assert spec_of(space).budget.early_stopping == "none"
    with pytest.raises(InvalidFieldsError) as err:
        spec_of(space, {"trials": 4, "max_seconds": 600, "early_stopping": "median"})
    assert "use 'none' when n_epochs is searched" in dict(err.value.problems)["search.early_stopping"]
    assert spec_of().budget.early_stopping == "median"  # the default otherwise


def test_a_stored_search_is_rebuilt_as_created_even_if_its_values_no_longer_validate():
    """A rule tightened by an upgrade must not stop a running search (each trial is validated when made)."""
    column = stored(spec_of())
    column["fixed"]["n_epochs"] = -1  # no job takes it
    rebuilt = spec_of_column("lora", column)
    assert rebuilt.fixed["n_epochs"] == -1 and rebuilt.space == spec_of().space
    assert rebuilt.budget == spec_of().budget


def test_grid_needs_choices_and_defaults_to_every_combination():
    with pytest.raises(InvalidFieldsError, match="'grid' needs choices, not ranges; learning_rate"):
        spec_of(search={"sampler": "grid"})
    grid = spec_of({"learning_rate": {"choice": [1e-4, 1e-3]}, "lora_r": {"choice": [8, 16]}}, {"sampler": "grid"})
    assert grid.budget.trials == 4
    with pytest.raises(InvalidFieldsError, match="more than the grid's 4 combinations"):
        spec_of({"lora_r": {"choice": [8, 16]}, "learning_rate": {"choice": [1e-4, 1e-3]}},
                {"sampler": "grid", "trials": 5})
    study = run(SearchStudy(grid, seed=1))
    assert sorted((r.params["learning_rate"], r.params["lora_r"]) for r in study.records.values()) == [
        (1e-4, 8), (1e-4, 16), (1e-3, 8), (1e-3, 16)]
    assert study.best().params == {"learning_rate": 1e-3, "lora_r": 16}


def test_a_search_of_four_trials_picks_the_minimum_validation_loss():
    study = run(SearchStudy(spec_of(search={"trials": 4, "early_stopping": "none"}), seed=7))
    assert len(study.records) == 4 and study.finished() and study.ask() is None
    complete = [r for r in study.records.values() if r.state == "complete"]
    assert len(complete) == 4
    assert study.best().value == min(r.value for r in complete)
    for row in study.table():  # values inside the space, as plain JSON numbers
        assert 1e-4 <= row["params"]["learning_rate"] <= 1e-2 and row["params"]["lora_r"] in (8, 16)
        assert type(row["params"]["lora_r"]) is int and row["epochs_reported"] == 3


def test_proposals_are_reproducible_from_the_seed():
    first = run(SearchStudy(spec_of(), seed=3)).table()
    again = run(SearchStudy(spec_of(), seed=3)).table()
    assert first == again


def test_the_median_pruner_stops_a_trial_worse_than_the_others_at_the_same_epoch():
    spec = spec_of({"learning_rate": {"choice": [1e-3, 1e-2, 1e-4]}, "lora_r": 16},
                   {"trials": 3, "sampler": "grid", "early_stopping": "median"})
    study = SearchStudy(spec, seed=0)
    seen = []

    def scripted(params):  # the third trial, whatever its values, is far worse from its first epoch
        seen.append(params)
        return [0.5, 0.4, 0.3] if len(seen) <= 2 else [5.0, 4.0, 3.0]

    run(study, scripted)
    states = [study.records[n].state for n in sorted(study.records)]
    assert states == ["complete", "complete", "pruned"]
    assert study.records[2].reports == {0: 5.0}  # stopped after its first epoch's report
    assert study.best().value == 0.3


def test_the_wall_time_budget_stops_new_trials():
    now = [1000.0]
    study = SearchStudy(spec_of(search={"trials": 10, "max_seconds": 600}), seed=1, clock=lambda: now[0])
    first = study.ask()
    study.tell(first.number, "complete", 1.5)
    now[0] += 599
    second = study.ask()
    assert second is not None and not study.over_time()
    now[0] += 1
    assert study.over_time() and study.ask() is None and not study.finished()  # the second is still running
    study.tell(second.number, "pruned")  # the control plane stops it, through the job's cancel
    assert study.finished() and len(study.records) == 2 and study.best().number == first.number


def test_a_failed_or_diverged_trial_is_never_the_best():
    study = SearchStudy(spec_of(search={"trials": 3}), seed=1)
    a, b, c = study.ask(), study.ask(), study.ask()
    study.tell(a.number, "complete", float("nan"))
    study.tell(b.number, "failed")
    study.tell(c.number, "complete", 2.0)
    assert [r.state for r in study.records.values()] == ["failed", "failed", "complete"]
    assert study.best().number == c.number


def test_a_study_is_rebuilt_from_its_trials_after_a_restart():
    spec = spec_of(search={"trials": 4, "max_seconds": 600})
    before = SearchStudy(spec, seed=5, started=100.0, clock=lambda: 200.0)
    done, running = before.ask(), before.ask()
    for epoch, loss in enumerate(losses(done.params)):
        before.report(done.number, epoch, loss)
    before.tell(done.number, "complete", loss)
    before.report(running.number, 0, 9.0)
    saved = [TrialRecord(r.number, r.params, r.state, r.value, dict(r.reports)) for r in before.records.values()]

    after = SearchStudy(spec, seed=5, started=100.0, clock=lambda: 200.0)
    after.restore(saved)
    assert after.table() == before.table() and after.deadline == 700.0
    assert after.best().value == loss
    after.tell(running.number, "complete", 0.5)  # the running trial's job finished meanwhile
    run(after)
    assert len(after.records) == 4
    assert after.best().value == min(r.value for r in after.records.values() if r.state == "complete")


def test_a_grid_search_rebuilt_after_a_restart_runs_the_combinations_left():
    spec = spec_of({"learning_rate": {"choice": [1e-4, 1e-3]}, "lora_r": {"choice": [8, 16]}},
                   {"sampler": "grid", "early_stopping": "none"})
    before = SearchStudy(spec, seed=2)
    first = before.ask()
    before.tell(first.number, "complete", 3.0)
    after = SearchStudy(spec, seed=2)
    after.restore([TrialRecord(r.number, r.params, r.state, r.value) for r in before.records.values()])
    run(after)
    combos = [(r.params["learning_rate"], r.params["lora_r"]) for r in after.records.values()]
    assert sorted(combos) == [(1e-4, 8), (1e-4, 16), (1e-3, 8), (1e-3, 16)]
    assert [r.number for r in after.records.values()] == [0, 1, 2, 3]
    assert after.best().params == {"learning_rate": 1e-3, "lora_r": 16}


def test_without_early_stopping_a_bad_trial_runs_to_its_end():
    spec = spec_of({"learning_rate": {"choice": [1e-3, 1e-2, 1e-4]}}, {"trials": 3, "early_stopping": "none"})
    runs = []
    study = run(SearchStudy(spec, seed=0), lambda p: runs.append(p) or ([0.5, 0.3] if len(runs) <= 2 else [5.0, 4.0]))
    assert [r.state for r in study.records.values()] == ["complete"] * 3
    assert study.records[2].reports == {0: 5.0, 1: 4.0}


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_study_rebuilt_after_each_trial_draws_new_values_reproducibly(sampler):
    """The search driver restores the study from the trial table before every ask, as after a restart."""
    def drive():
        records: list[TrialRecord] = []
        for _ in range(4):
            study = SearchStudy(spec_of(search={"trials": 4, "max_seconds": 600, "sampler": sampler}), seed=5)
            study.restore(records)
            proposal = study.ask()
            records.append(TrialRecord(proposal.number, proposal.params, "complete",
                                       losses(proposal.params)[-1], {}))
        return [r.params for r in records]

    first = drive()
    assert len({p["learning_rate"] for p in first}) == 4  # a fresh study's seed would repeat trial 0's values
    assert drive() == first
