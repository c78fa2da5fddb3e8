"""Hyperparameter search jobs: the search space, the trial budget, and the Optuna study that proposes trials.

A search job is a fine-tuning job whose ``method.<type>.hyperparameters`` give
a range or a list of choices for some fields, with a top-level ``search``
object stating the budget before anything runs::

    "method": {"type": "lora", "lora": {"hyperparameters": {
        "learning_rate": {"range": [1e-4, 1e-2], "scale": "log"},
        "lora_r": {"choice": [8, 16]},
        "n_epochs": 2}}},
    "search": {"trials": 4, "max_seconds": 3600, "sampler": "tpe", "early_stopping": "median"}

A choice is always an object (``{"choice": [...]}``), never a bare list:
``target_modules`` already takes a list as its plain value. Only the fields
in :data:`SEARCHABLE` may vary; every other field is fixed for all trials and
validated as a job's would be. The objective is the trial's final validation
loss, minimised.

The engine is Optuna's ask-and-tell interface (:class:`SearchStudy`): the
control plane asks for a trial's parameters, runs the trial as a job in its
own sandboxed worker, reports the trial's validation losses as they arrive
(the pruner answers whether to stop it early) and tells the study how it ended.
The study lives in memory; the trials' records are the truth, and
:meth:`SearchStudy.restore` rebuilds a study from them after a restart. This
module imports Optuna only when a study is built, so the API process validates
a search cheaply.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.errors import InvalidFieldsError, InvalidRequestError
from appliance.jobs.recipes import ALIASES
from appliance.training.hyperparameters import HYPERPARAMETERS
from appliance.trainkit.errors import HyperparameterError
from appliance.trainkit.hyperparameters import AUTO, is_int, is_number, prefix

__all__ = ["SEARCHABLE", "Choice", "Proposal", "Range", "SearchBudget", "SearchSpec", "SearchStudy",
           "TrialRecord", "budget_message", "largest", "parse_search", "parse_search_method", "spec_of", "stored"]

Sampler = Literal["tpe", "random", "grid"]
EarlyStopping = Literal["median", "none"]
SAMPLERS: tuple[str, ...] = ("tpe", "random", "grid")
EARLY_STOPPING: tuple[str, ...] = ("median", "none")
#: The fields a search may vary, and whether each takes integers.
SEARCHABLE: dict[str, bool] = {
    "learning_rate": False, "lora_r": True, "n_epochs": True, "batch_size": True,
    "weight_decay": False, "lora_dropout": False, "warmup_ratio": False,
}
MAX_TRIALS = 64
MAX_CHOICES = 32
#: Without ``max_seconds`` a search may run a day; the job states it either way.
DEFAULT_MAX_SECONDS = 86_400
MAX_SECONDS = 7 * 86_400
MIN_SECONDS = 60
#: The median pruner stops no trial before this many have finished, nor before the first epoch's report.
PRUNER_STARTUP_TRIALS = 2


@dataclass(frozen=True)
class Range:
    """Values from ``low`` to ``high`` inclusive; ``log`` samples the exponent evenly (learning rates)."""

    low: float
    high: float
    scale: Literal["linear", "log"] = "linear"
    integer: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"range": [self.low, self.high], "scale": self.scale}


@dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"choice": list(self.values)}


@dataclass(frozen=True)
class SearchBudget:
    """What a search may spend, stated in the job before its first trial starts.

    Attributes:
        trials: Trials at most (pruned and failed ones count).
        max_seconds: Wall time from the search's start; no trial starts after it, running ones are stopped.
        sampler: How the next trial's values are chosen: ``tpe`` (Optuna's default, learns from finished
            trials), ``random``, or ``grid`` (every combination of choices, in a seeded order).
        early_stopping: ``median`` stops a trial whose validation loss at an epoch is worse than the median
            of earlier trials at that epoch; ``none`` runs every trial to its end.
    """

    trials: int
    max_seconds: int = DEFAULT_MAX_SECONDS
    sampler: Sampler = "tpe"
    early_stopping: EarlyStopping = "median"

    def to_dict(self) -> dict[str, Any]:
        return {"trials": self.trials, "max_seconds": self.max_seconds, "sampler": self.sampler,
                "early_stopping": self.early_stopping}


@dataclass(frozen=True)
class SearchSpec:
    """A validated search: the fixed hyperparameters, the space of the varied ones, and the budget."""

    method: str
    fixed: dict[str, Any]
    space: dict[str, Range | Choice]
    budget: SearchBudget

    def trial_hyperparameters(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters of the trial with ``params``, as a job's ``method.<type>.hyperparameters``."""
        return {**self.fixed, **params}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the job object and its audit record: the space and the budget."""
        return {"space": {name: dim.to_dict() for name, dim in self.space.items()}, **self.budget.to_dict()}


def parse_search(method_type: str, hyperparameters: Mapping[str, Any], search: Any,
                 validate: Callable[[dict[str, Any]], Any]) -> SearchSpec:
    """Split a job's hyperparameters into fixed values and a search space, and check the budget.

    Every problem is reported at once, each naming its field and the value received.

    Args:
        method_type: The job's method (``lora``), for the field paths.
        hyperparameters: ``method.<type>.hyperparameters`` as received, ranges and choices included.
        search: The request's ``search`` object.
        validate: Builds a method's hyperparameters from a plain dict, raising :class:`HyperparameterError`
            (e.g. ``HYPERPARAMETERS["lora"](**values)``); each endpoint and choice is checked with it, beside
            the fixed fields, so a value no job could take is refused here and not in a trial.

    Raises:
        InvalidFieldsError: Listing every problem.
    """
    at = prefix(method_type)
    problems: list[tuple[str, str]] = []
    fixed: dict[str, Any] = {}
    space: dict[str, Range | Choice] = {}
    for name, value in hyperparameters.items():
        if not _is_dimension(value):
            fixed[name] = value
            continue
        if name not in SEARCHABLE:
            problems.append((f"{at}.{name}", f"cannot be searched; searchable: {', '.join(SEARCHABLE)}"))
            continue
        dimension = _parse_dimension(f"{at}.{name}", value, SEARCHABLE[name], problems)
        if dimension is not None:
            space[name] = dimension
    if not space:
        problems.append((at, "a search needs at least one range or choice, such as "
                             '"learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}'))
    if "learning_rate" in space and fixed.get("learning_rate_multiplier", AUTO) != AUTO:
        problems.append((f"{at}.learning_rate_multiplier", "must be \"auto\" when learning_rate is searched"))
    if not problems:
        problems += _check_values(at, fixed, space, validate)
    budget = _parse_budget(search, space, problems)
    if problems:
        raise InvalidFieldsError(problems)
    return SearchSpec(method_type, fixed, space, budget)


def _is_dimension(value: Any) -> bool:
    return isinstance(value, Mapping) and ("range" in value or "choice" in value)


def _parse_dimension(at: str, value: Mapping[str, Any], integer: bool,
                     problems: list[tuple[str, str]]) -> Range | Choice | None:
    extra = sorted(set(value) - {"range", "scale", "choice"})
    if extra or ("range" in value and "choice" in value):
        problems.append((at, "must be {\"range\": [low, high], \"scale\": \"linear\"|\"log\"} or "
                             f"{{\"choice\": [...]}}; got keys {sorted(value)}"))
        return None
    if "choice" in value:
        values = value["choice"]
        if "scale" in value:
            problems.append((f"{at}.scale", "applies to a range, not a choice"))
        if not isinstance(values, list) or not values or len(values) > MAX_CHOICES:
            problems.append((f"{at}.choice", f"must be a list of 1 to {MAX_CHOICES} values; got {values!r:.80}"))
            return None
        bad = [(i, v) for i, v in enumerate(values) if not (is_int(v) if integer else is_number(v))]
        for i, v in bad:
            problems.append((f"{at}.choice[{i}]", f"must be {'an integer' if integer else 'a number'}; got {v!r:.40}"))
        if bad:
            return None
        if len(set(values)) != len(values):
            problems.append((f"{at}.choice", f"must not repeat a value; got {values!r:.80}"))
        return Choice(tuple(values))
    bounds, scale = value["range"], value.get("scale", "linear")
    ok_bound = is_int if integer else is_number
    if not isinstance(bounds, list) or len(bounds) != 2 or not all(ok_bound(b) for b in bounds):
        kind = "integers" if integer else "numbers"
        problems.append((f"{at}.range", f"must be [low, high], two {kind}; got {bounds!r:.80}"))
        return None
    low, high = bounds
    if not low < high:
        problems.append((f"{at}.range", f"low must be below high; got {bounds!r}"))
        return None
    if scale not in ("linear", "log"):
        problems.append((f"{at}.scale", f"must be 'linear' or 'log'; got {scale!r:.40}"))
        return None
    if scale == "log" and low <= 0:
        problems.append((f"{at}.range", f"a log scale needs low above 0; got {bounds!r}"))
        return None
    return Range(low, high, scale, integer)


def _check_values(at: str, fixed: dict[str, Any], space: dict[str, Range | Choice],
                  validate: Callable[[dict[str, Any]], Any]) -> list[tuple[str, str]]:
    """The fixed fields' problems; then each endpoint and choice beside them (the other searched fields "auto")."""
    try:
        validate(dict(fixed))
    except HyperparameterError as exc:
        return list(exc.problems)
    problems: list[tuple[str, str]] = []
    for name, dim in space.items():
        values = dim.values if isinstance(dim, Choice) else (dim.low, dim.high)
        for i, value in enumerate(values):
            try:
                validate({**fixed, name: value})
            except HyperparameterError as exc:
                where = f"{at}.{name}.{'choice' if isinstance(dim, Choice) else 'range'}[{i}]"
                problems += [p for p in ((where if param == f"{at}.{name}" else param, message)
                                         for param, message in exc.problems) if p not in problems]
    return problems


def _parse_budget(search: Any, space: dict[str, Range | Choice], problems: list[tuple[str, str]]) -> SearchBudget:
    if not isinstance(search, Mapping):
        problems.append(("search", f'must be an object such as {{"trials": 4, "max_seconds": 3600}}; '
                                   f"got {type(search).__name__}"))
        return SearchBudget(trials=1)
    problems += [(f"search.{key}", "is not a search option (known: trials, max_seconds, sampler, early_stopping)")
                 for key in sorted(set(search) - {"trials", "max_seconds", "sampler", "early_stopping"})]
    sampler = search.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        problems.append(("search.sampler", f"must be one of {', '.join(map(repr, SAMPLERS))}; got {sampler!r:.40}"))
        sampler = "tpe"
    grid = math.prod(len(d.values) for d in space.values() if isinstance(d, Choice))
    if sampler == "grid" and (ranges := [n for n, d in space.items() if isinstance(d, Range)]):
        problems.append(("search.sampler", f"'grid' needs choices, not ranges; {', '.join(ranges)} "
                                           "gives a range (list its values with \"choice\", or use 'tpe')"))
    trials = search.get("trials", grid if sampler == "grid" else None)
    if trials is None:
        problems.append(("search.trials", f"is required: how many trials at most (1 to {MAX_TRIALS})"))
        trials = 1
    elif not is_int(trials) or not 1 <= trials <= MAX_TRIALS:
        problems.append(("search.trials", f"must be an integer from 1 to {MAX_TRIALS}; got {trials!r:.40}"))
        trials = 1
    elif sampler == "grid" and trials > grid:
        problems.append(("search.trials", f"is {trials}, more than the grid's {grid} combinations; "
                                          f"give at most {grid} or omit it"))
    seconds = search.get("max_seconds", DEFAULT_MAX_SECONDS)
    if not is_int(seconds) or not MIN_SECONDS <= seconds <= MAX_SECONDS:
        problems.append(("search.max_seconds", f"must be an integer from {MIN_SECONDS} to {MAX_SECONDS} "
                                               f"(seconds of wall time); got {seconds!r:.40}"))
        seconds = DEFAULT_MAX_SECONDS
    # The median rule compares trials' losses at the same epoch: with n_epochs searched their learning-rate
    # schedules differ in length there, and the longer trials would be stopped for being early in theirs.
    epochs_searched = "n_epochs" in space
    stopping = search.get("early_stopping", "none" if epochs_searched else "median")
    if stopping not in EARLY_STOPPING:
        problems.append(("search.early_stopping",
                         f"must be one of {', '.join(map(repr, EARLY_STOPPING))}; got {stopping!r:.40}"))
        stopping = "median"
    elif stopping == "median" and epochs_searched:
        problems.append(("search.early_stopping", "'median' compares trials at the same epoch, which trials of "
                                                  "different n_epochs are not (their schedules differ): use 'none' "
                                                  "when n_epochs is searched"))
    return SearchBudget(trials, seconds, sampler, stopping)


# --------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Proposal:
    """A trial to run: its number in the study and its values of the searched fields."""

    number: int
    params: dict[str, Any]


@dataclass
class TrialRecord:
    """A trial as the control plane keeps it (rebuilt into a study by :meth:`SearchStudy.restore`).

    ``state`` is ``running``, ``complete`` (``value`` is its final validation loss), ``pruned`` or ``failed``;
    ``reports`` maps an epoch to the validation loss reported at its end.
    """

    number: int
    params: dict[str, Any]
    state: Literal["running", "complete", "pruned", "failed"] = "running"
    value: float | None = None
    reports: dict[int, float] = field(default_factory=dict)


class SearchStudy:
    """An Optuna study driven by ask-and-tell: the control plane runs each trial as a job.

    Args:
        spec: The validated search.
        seed: The search job's seed: the sampler's proposals are reproducible from it.
        started: When the search started (``clock`` time), the origin of ``max_seconds``.
        clock: Seconds, as ``time.time`` (wall time, so that a restarted control plane keeps the deadline).
    """

    def __init__(self, spec: SearchSpec, seed: int, *, started: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines would log trial values
        self.spec, self.clock = spec, clock
        self.started = clock() if started is None else started
        self._optuna = optuna
        self.distributions = {name: _distribution(optuna, dim) for name, dim in spec.space.items()}
        budget = spec.budget
        self.seed = seed
        sampler = self._sampler(seed)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)
                  if budget.early_stopping == "median" else optuna.pruners.NopPruner())
        self.study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
        #: grid: every combination, in an order drawn from the seed; each ask enqueues the next one unused
        #: (Optuna's GridSampler stops the study from inside tell(), which only works under optimize())
        self._grid: list[dict[str, Any]] = []
        if budget.sampler == "grid":
            names = list(spec.space)
            combos = list(itertools.product(*(spec.space[n].values for n in names)))
            random.Random(seed).shuffle(combos)
            self._grid = [dict(zip(names, values)) for values in combos]
        self._trials: dict[int, Any] = {}
        self.records: dict[int, TrialRecord] = {}

    # -- budget -------------------------------------------------------------
    @property
    def deadline(self) -> float:
        return self.started + self.spec.budget.max_seconds

    def over_time(self) -> bool:
        """Whether the wall-time budget is spent: no trial starts, running ones are to be stopped."""
        return self.clock() >= self.deadline

    def exhausted(self) -> bool:
        """Whether no further trial may start: the count or the time is spent."""
        return len(self.records) >= self.spec.budget.trials or self.over_time()

    def finished(self) -> bool:
        """Whether the search is over: no further trial may start and none is running."""
        return self.exhausted() and not any(r.state == "running" for r in self.records.values())

    # -- ask, report, tell --------------------------------------------------
    def ask(self) -> Proposal | None:
        """The next trial's values, or None when the budget allows no further trial."""
        if self.exhausted():
            return None
        if self._grid:
            used = [r.params for r in self.records.values()]
            self.study.enqueue_trial(next(combo for combo in self._grid if combo not in used))
        trial = self.study.ask(self.distributions)
        self._trials[trial.number] = trial
        params = {name: _plain(trial.params[name]) for name in self.spec.space}
        self.records[trial.number] = TrialRecord(trial.number, params)
        return Proposal(trial.number, params)

    def report(self, number: int, epoch: int, valid_loss: float) -> bool:
        """Record a running trial's validation loss at the end of ``epoch``; True when it should be stopped."""
        record = self.records[number]
        if record.state != "running" or epoch in record.reports:
            return False
        record.reports[epoch] = float(valid_loss)
        trial = self._trials[number]
        trial.report(float(valid_loss), epoch)
        return trial.should_prune()

    def tell(self, number: int, state: Literal["complete", "pruned", "failed"], value: float | None = None) -> None:
        """How a trial ended: ``complete`` with its final validation loss, ``pruned`` (stopped early), ``failed``."""
        record = self.records[number]
        if record.state != "running":
            return
        if state == "complete" and (value is None or not math.isfinite(value)):
            state = "failed"  # a loss that is NaN or missing cannot be compared: the trial failed
        record.state, record.value = state, (float(value) if state == "complete" else None)
        trial_state = {"complete": self._optuna.trial.TrialState.COMPLETE,
                       "pruned": self._optuna.trial.TrialState.PRUNED,
                       "failed": self._optuna.trial.TrialState.FAIL}[state]
        self.study.tell(number, record.value if state == "complete" else None, state=trial_state)

    def best(self) -> TrialRecord | None:
        """The completed trial of the lowest validation loss (the earliest among equals); None before one."""
        done = [r for r in self.records.values() if r.state == "complete"]
        return min(done, key=lambda r: (r.value, r.number)) if done else None

    # -- restart ------------------------------------------------------------
    def restore(self, records: list[TrialRecord]) -> None:
        """Rebuild the study from the trials' records, in number order, before any ask.

        Ended trials are added with their outcome and reports, so the sampler and the pruner learn from them;
        a trial still running is re-asked with the same values (an enqueued trial), keeping its number.
        """
        if self.records:
            raise RuntimeError("restore() rebuilds a fresh study; this one has trials already")
        optuna = self._optuna
        for record in sorted(records, key=lambda r: r.number):
            if record.number != len(self.records):
                raise ValueError(f"trial records must be numbered 0, 1, ... in order; got {record.number}")
            if record.state == "running":
                self.study.enqueue_trial(record.params)
                trial = self.study.ask(self.distributions)
                self._trials[trial.number] = trial
                for epoch, loss in sorted(record.reports.items()):
                    trial.report(loss, epoch)
            else:
                state = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                         "failed": optuna.trial.TrialState.FAIL}[record.state]
                self.study.add_trial(optuna.trial.create_trial(
                    params=dict(record.params), distributions=self.distributions, state=state,
                    value=record.value if record.state == "complete" else None,
                    intermediate_values=dict(record.reports)))
            self.records[record.number] = TrialRecord(record.number, dict(record.params), record.state,
                                                      record.value, dict(record.reports))
        # A sampler seeded as a fresh study's would propose the first trial's values again: its seed follows
        # the history instead, so a study restored after each trial still draws new values, reproducibly.
        if records:
            self.study.sampler = self._sampler(self.seed + 7919 * len(records))

    def _sampler(self, seed: int) -> Any:
        if self.spec.budget.sampler in ("random", "grid"):
            return self._optuna.samplers.RandomSampler(seed=seed)
        return self._optuna.samplers.TPESampler(seed=seed)

    def table(self) -> list[dict[str, Any]]:
        """The trials as rows (number, state, values, final validation loss, epochs reported), for the job page."""
        return [{"number": r.number, "state": r.state, "params": dict(r.params), "valid_loss": r.value,
                 "epochs_reported": len(r.reports)} for r in sorted(self.records.values(), key=lambda r: r.number)]


def _distribution(optuna: Any, dim: Range | Choice) -> Any:
    if isinstance(dim, Choice):
        return optuna.distributions.CategoricalDistribution(list(dim.values))
    if dim.integer:
        return optuna.distributions.IntDistribution(int(dim.low), int(dim.high), log=dim.scale == "log")
    return optuna.distributions.FloatDistribution(float(dim.low), float(dim.high), log=dim.scale == "log")


def _plain(value: Any) -> Any:
    """A JSON-ready value (numpy scalars from a sampler become int or float)."""
    if hasattr(value, "item"):
        return value.item()
    return value


# --------------------------------------------------------------------------- a search job


def parse_search_method(method: Any, search: Any) -> tuple[SearchSpec, dict[str, Any]]:
    """A search job's spec, and its ``method`` with the fixed values only: the template every trial fills in.

    Args:
        method: The request's ``method`` object, ranges and choices in its hyperparameters.
        search: The request's ``search`` object.

    Raises:
        InvalidRequestError: A method that is not a language-model one, or (as :class:`InvalidFieldsError`)
            every problem of the space and the budget.
    """
    named = method.get("type", "lora") if isinstance(method, Mapping) else None
    kind = ALIASES.get(named, named) if isinstance(named, str) else None
    if kind not in HYPERPARAMETERS:
        raise InvalidRequestError(f"`search` varies the hyperparameters of {', '.join(HYPERPARAMETERS)} jobs; "
                                  f"got method {named!r:.40}", param="search")
    body = method.get(named) or {}
    hyperparameters = body.get("hyperparameters") if isinstance(body, Mapping) else None
    if not isinstance(hyperparameters, Mapping):
        raise InvalidRequestError(f"`search` needs `method.{kind}.hyperparameters` with a range or choice, such as "
                                  '"learning_rate": {"range": [1e-4, 1e-2], "scale": "log"}',
                                  param=f"method.{kind}.hyperparameters")
    spec = parse_search(kind, hyperparameters, search, builder(kind))
    return spec, {"type": kind, kind: {**body, "hyperparameters": dict(spec.fixed)}}


def largest(spec: SearchSpec, names: tuple[str, ...] = ("lora_r", "batch_size")) -> dict[str, Any]:
    """The largest value of each searched field in ``names``: what the memory plan of every trial must fit."""
    out = {}
    for name in names:
        dim = spec.space.get(name)
        if isinstance(dim, Choice):
            out[name] = max(dim.values)
        elif isinstance(dim, Range):
            out[name] = int(dim.high) if dim.integer else dim.high
    return out


def stored(spec: SearchSpec) -> dict[str, Any]:
    """A search job's ``search`` column: the spec (space, budget, fixed values) and its trial table, empty."""
    return {**spec.to_dict(), "fixed": dict(spec.fixed), "trial_table": [], "best_trial": None}


def spec_of(method_type: str, search: Mapping[str, Any]) -> SearchSpec:
    """The :class:`SearchSpec` a search job's ``search`` column (:func:`stored`) holds, as it was validated at
    creation: not validated again, so that a rule tightened since (an upgrade) cannot stop a running search;
    each trial's values are validated when its job is made."""
    space: dict[str, Range | Choice] = {}
    for name, dim in search["space"].items():
        if "choice" in dim:
            space[name] = Choice(tuple(dim["choice"]))
        else:
            low, high = dim["range"]
            space[name] = Range(low, high, dim.get("scale", "linear"), SEARCHABLE.get(name, False))
    budget = SearchBudget(search["trials"], search["max_seconds"], search["sampler"], search["early_stopping"])
    return SearchSpec(method_type, dict(search["fixed"]), space, budget)


def builder(kind: str) -> Callable[[dict[str, Any]], Any]:
    """``HYPERPARAMETERS[kind]`` built from a plain dict, an unknown name a :class:`HyperparameterError` naming
    it (as a job's would be), never the constructor's TypeError."""
    cls = HYPERPARAMETERS[kind]
    known = {f.name for f in dataclasses.fields(cls)}

    def build(values: dict[str, Any]) -> Any:
        if unknown := sorted(set(values) - known):
            raise HyperparameterError([(f"{prefix(kind)}.{name}", "is not a known hyperparameter; known: "
                                        + ", ".join(sorted(known))) for name in unknown])
        return cls(**values)

    return build


def budget_message(spec: SearchSpec) -> str:
    """The creation event stating what the search may spend, before it starts."""
    b = spec.budget
    stopping = ("median (a trial whose validation loss at an epoch is worse than the median of earlier trials "
                "there is stopped)" if b.early_stopping == "median" else "none (every trial runs to its end)")
    return (f"Hyperparameter search: at most {b.trials} trial{'s' * (b.trials != 1)}"
            f" within {b.max_seconds} s of wall time, sampler {b.sampler}, early stopping {stopping}; searching "
            + ", ".join(f"{name} {_describe(dim)}" for name, dim in spec.space.items())
            + "; the trial of the lowest final validation loss is the search's model")


def _describe(dim: Range | Choice) -> str:
    if isinstance(dim, Choice):
        return "in {" + ", ".join(str(v) for v in dim.values) + "}"
    return f"from {dim.low:g} to {dim.high:g}" + (" (log scale)" if dim.scale == "log" else "")
