"""Hyperparameters per training method, validated in full and resolved from ``"auto"``.

The shapes follow the OpenAI fine-tuning API: a job carries
``method: {"type": "lora", "lora": {"hyperparameters": {...}}}`` and every
numeric field accepts ``"auto"``. :meth:`TrainingSpec.from_method` parses that
object; validation reports *all* problems at once, each naming the field path
and the value received. This module imports no torch, so the API process can
validate a job cheaply.

``"auto"`` rules (applied by :func:`resolve` once the data is tokenised):

=============================  ==============================================================
field                          auto value
=============================  ==============================================================
n_epochs                       3, raised to ``ceil(100 / n)`` (at most 25) when ``3 n < 100``,
                               lowered to ``25000 // n`` (at least 1) when ``3 n > 25000``
                               (OpenAI's published rule; ``n`` = training examples)
batch_size                     the power of two at or above ``0.2% of n``, clamped to [4, 32],
                               and at most ``n``
learning_rate                  ``2e-4 * learning_rate_multiplier``
learning_rate_multiplier       1.0; with ``learning_rate`` set, ``learning_rate / 2e-4``
lora_r                         16 (vLLM's default ``--max-lora-rank``)
lora_alpha                     ``2 * lora_r``
lora_dropout                   0.05
target_modules                 every attention and MLP projection of the architecture
max_seq_length                 longest tokenised example rounded up to a multiple of 64,
                               at most 2048 and the model's context length
warmup_ratio                   0.03
weight_decay                   0.0
gradient_accumulation_steps    enough micro-batches to keep each under 16384 tokens
                               (``ceil(batch_size * max_seq_length / 16384)``, at most
                               ``batch_size``), more when the memory plan says a
                               micro-batch that large does not fit the device
checkpoint_every_steps         one checkpoint per epoch (``ceil(n / batch_size)``); 0 = never
precision (LoRA)               ``bf16`` on a CUDA device with bf16, else ``fp32``
gradient_checkpointing (LoRA)  the memory plan's choice (:mod:`appliance.training.planner`):
                               on when the step's micro-batches would not fit without it
                               (never with ``dp``); QLoRA always checkpoints
dp.delta (LoRA)                ``min(1e-5, 1 / (10 n))``: well below ``1 / n``, as (epsilon,
                               delta)-DP needs
=============================  ==============================================================

``batch_size`` is the number of examples per optimizer step, as in the OpenAI
API; ``gradient_accumulation_steps`` splits those examples into that many
forward passes without changing the step's maths.

``dp`` (LoRA only; absent or ``null`` = no differential privacy) trains with
DP-SGD through Opacus: ``{"epsilon": 8, "delta": "auto", "max_grad_norm": 1.0}``.
``epsilon`` is required; :mod:`appliance.training.dp` says what the guarantee
covers. QLoRA refuses it: its activation checkpointing re-runs forward passes,
which Opacus' per-example gradient hooks cannot follow.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from appliance.modelstore.architectures import FORBIDDEN_TARGET_MODULES
from appliance.trainkit.errors import HyperparameterError
from appliance.trainkit.hyperparameters import AUTO, Auto, FieldChecks, check_spec, parse_method
from appliance.trainkit.hyperparameters import is_int as _is_int
from appliance.trainkit.hyperparameters import is_number as _is_number
from appliance.trainkit.hyperparameters import prefix as _prefix
from appliance.trainkit.registry import RecipeCapabilities

__all__ = ["AUTO", "HYPERPARAMETERS", "SHARDING", "Auto", "DifferentialPrivacy", "HyperparameterError",
           "Hyperparameters", "LoraHyperparameters", "QloraHyperparameters", "TrainingSpec",
           "hyperparameters_from_dict", "resolve"]

Precision = Literal["auto", "fp32", "bf16"]

BASE_LEARNING_RATE = 2e-4
#: ``auto`` values that do not depend on the data (the job planner assumes the same at creation).
AUTO_LORA_R = 16
AUTO_LORA_DROPOUT = 0.05
AUTO_MAX_SEQ_LENGTH_CAP = 2048
AUTO_MIN_BATCH_SIZE = 4
MICRO_BATCH_TOKEN_BUDGET = 16384
_MODULE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
DP_AUTO_DELTA_CAP = 1e-5
#: How a data-parallel LoRA run lays the base model over its workers (``compute.sharding``):
#: ``auto`` decides from the model's size, ``none`` replicates it, ``fsdp`` shards it.
SHARDING = ("auto", "none", "fsdp")


@dataclass(frozen=True)
class DifferentialPrivacy:
    """DP-SGD settings: the run is (``epsilon``, ``delta``)-differentially private for each training record.

    Attributes:
        epsilon: The privacy budget the whole run may spend; greater than 0.
        delta: Probability the epsilon bound may fail, in (0, 1), or ``"auto"``
            (``min(1e-5, 1 / (10 n))`` for ``n`` training examples).
        max_grad_norm: Each example's gradient is clipped to this L2 norm before
            the noise is added; greater than 0.
    """

    epsilon: float
    delta: float | Auto = AUTO
    max_grad_norm: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LoraHyperparameters:
    """LoRA on a full-precision base model.

    Every field but ``seed`` accepts ``"auto"``; see the module docstring for
    what it resolves to. Construction validates every field and raises
    :class:`HyperparameterError` listing all problems.
    """

    n_epochs: int | Auto = AUTO
    batch_size: int | Auto = AUTO
    learning_rate: float | Auto = AUTO
    learning_rate_multiplier: float | Auto = AUTO
    lora_r: int | Auto = AUTO
    lora_alpha: float | Auto = AUTO
    lora_dropout: float | Auto = AUTO
    target_modules: tuple[str, ...] | Auto = AUTO
    max_seq_length: int | Auto = AUTO
    warmup_ratio: float | Auto = AUTO
    weight_decay: float | Auto = AUTO
    gradient_accumulation_steps: int | Auto = AUTO
    checkpoint_every_steps: int | Auto = AUTO
    seed: int = 0
    precision: Precision = AUTO
    gradient_checkpointing: bool | Auto = AUTO
    dp: DifferentialPrivacy | None = None

    method = "lora"
    capabilities: ClassVar[RecipeCapabilities] = RecipeCapabilities(
        supports_dp=True, supports_fsdp=True, output="adapter"
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = _check_common(self, _prefix(self.method))
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(
                (f"{_prefix(self.method)}.precision", f"must be one of 'auto', 'fp32', 'bf16'; got {self.precision!r}")
            )
        dp, dp_problems = _parse_dp(self.dp, f"{_prefix(self.method)}.dp")
        object.__setattr__(self, "dp", dp)
        problems += dp_problems
        if self.gradient_checkpointing != AUTO and not isinstance(self.gradient_checkpointing, bool):
            problems.append((f"{_prefix(self.method)}.gradient_checkpointing",
                             f"must be true, false or \"auto\"; got {self.gradient_checkpointing!r}"))
        elif self.gradient_checkpointing is True and dp is not None:
            problems.append((f"{_prefix(self.method)}.gradient_checkpointing",
                             "must not be true with `dp`: Opacus' per-example gradients cannot follow a "
                             "recomputed forward pass"))
        if problems:
            raise HyperparameterError(problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (``target_modules`` as a list), e.g. for the job object."""
        return _to_dict(self)


@dataclass(frozen=True)
class QloraHyperparameters:
    """LoRA on a base model quantised to 4-bit NF4 with double quantisation.

    The compute dtype is not a choice: float32 on CPU, bfloat16 on CUDA.
    Same fields and ``"auto"`` rules as :class:`LoraHyperparameters`, less
    ``precision``.
    """

    n_epochs: int | Auto = AUTO
    batch_size: int | Auto = AUTO
    learning_rate: float | Auto = AUTO
    learning_rate_multiplier: float | Auto = AUTO
    lora_r: int | Auto = AUTO
    lora_alpha: float | Auto = AUTO
    lora_dropout: float | Auto = AUTO
    target_modules: tuple[str, ...] | Auto = AUTO
    max_seq_length: int | Auto = AUTO
    warmup_ratio: float | Auto = AUTO
    weight_decay: float | Auto = AUTO
    gradient_accumulation_steps: int | Auto = AUTO
    checkpoint_every_steps: int | Auto = AUTO
    seed: int = 0

    method = "qlora"
    #: No DP (activation checkpointing), no FSDP (the 4-bit base is already a quarter of the size).
    capabilities: ClassVar[RecipeCapabilities] = RecipeCapabilities(
        supports_dp=False, supports_fsdp=False, output="adapter"
    )
    #: Said of ``dp`` instead of "not a known hyperparameter".
    no_dp_reason: ClassVar[str] = (
        "is not supported with QLoRA (its activation checkpointing re-runs forward passes, which "
        "Opacus' per-example gradients cannot follow); use method.type 'lora' for differential privacy"
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = _check_common(self, _prefix(self.method))
        if problems:
            raise HyperparameterError(problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (``target_modules`` as a list), e.g. for the job object."""
        return _to_dict(self)


Hyperparameters = Union[LoraHyperparameters, QloraHyperparameters]

#: ``method.type`` -> its hyperparameters class (the recipe registry holds the code).
HYPERPARAMETERS: dict[str, type[LoraHyperparameters] | type[QloraHyperparameters]] = {
    "lora": LoraHyperparameters,
    "qlora": QloraHyperparameters,
}


@dataclass(frozen=True)
class TrainingSpec:
    """What to train: the method and its hyperparameters.

    Build it from the API's ``method`` object with :meth:`from_method`.
    """

    method: Literal["lora", "qlora"]
    hyperparameters: Hyperparameters

    def __post_init__(self) -> None:
        check_spec(self.method, self.hyperparameters, HYPERPARAMETERS)

    @classmethod
    def from_method(cls, method: Mapping[str, Any] | None) -> TrainingSpec:
        """Parse ``{"type": "lora", "lora": {"hyperparameters": {...}}}``.

        A missing ``method`` means LoRA with every hyperparameter ``"auto"``.
        Unknown keys are errors (a misspelt ``lora_rank`` must not be ignored).

        Raises:
            HyperparameterError: Listing every problem found.
        """
        return cls(*parse_method(method, HYPERPARAMETERS, default="lora", unknown=_unknown))


def _unknown(method: str, field: str, known: set[str]) -> str:
    hp_cls = HYPERPARAMETERS[method]
    if field == "dp" and not hp_cls.capabilities.supports_dp and hasattr(hp_cls, "no_dp_reason"):
        return hp_cls.no_dp_reason
    return f"is not a known hyperparameter; known: {', '.join(sorted(known))}"


def resolve(
    hp: Hyperparameters,
    *,
    n_train_examples: int,
    longest_example_tokens: int,
    context_length: int | None,
    default_target_modules: Sequence[str],
    device_type: str = "cpu",
    bf16_supported: bool = False,
    micro_batch_examples: int | None = None,
    checkpointing: bool | None = None,
) -> Hyperparameters:
    """Replace every ``"auto"`` with a concrete value (rules in the module docstring).

    Args:
        hp: Validated hyperparameters.
        n_train_examples: Training examples after the validation split.
        longest_example_tokens: Longest tokenised training example, untruncated.
        context_length: The model's ``max_position_embeddings``, if known.
        default_target_modules: The architecture's attention and MLP projections.
        device_type: ``cpu`` or ``cuda``.
        bf16_supported: Whether the device computes in bfloat16.
        micro_batch_examples: The memory plan's largest micro-batch, in examples (bounds
            ``gradient_accumulation_steps`` from below).
        checkpointing: The memory plan's activation checkpointing (LoRA's ``gradient_checkpointing``).

    Returns:
        A copy of ``hp`` with no ``"auto"`` left.
    """
    n = max(1, n_train_examples)
    values: dict[str, Any] = {}

    if hp.n_epochs == AUTO:
        epochs = 3
        if epochs * n < 100:
            epochs = min(25, math.ceil(100 / n))
        elif epochs * n > 25000:
            epochs = max(1, 25000 // n)
        values["n_epochs"] = epochs
    if hp.batch_size == AUTO:
        target = max(1, math.ceil(0.002 * n))
        values["batch_size"] = min(n, max(AUTO_MIN_BATCH_SIZE, min(32, 1 << (target - 1).bit_length())))
    batch_size = values.get("batch_size", hp.batch_size)

    if hp.learning_rate == AUTO:
        multiplier = 1.0 if hp.learning_rate_multiplier == AUTO else float(hp.learning_rate_multiplier)
        values["learning_rate_multiplier"] = multiplier
        values["learning_rate"] = BASE_LEARNING_RATE * multiplier
    else:
        values["learning_rate_multiplier"] = float(hp.learning_rate) / BASE_LEARNING_RATE
    if hp.lora_r == AUTO:
        values["lora_r"] = AUTO_LORA_R
    if hp.lora_alpha == AUTO:
        values["lora_alpha"] = float(2 * values.get("lora_r", hp.lora_r))
    if hp.lora_dropout == AUTO:
        values["lora_dropout"] = AUTO_LORA_DROPOUT
    if hp.target_modules == AUTO:
        values["target_modules"] = tuple(default_target_modules)
    if hp.max_seq_length == AUTO:
        cap = min(AUTO_MAX_SEQ_LENGTH_CAP, context_length or AUTO_MAX_SEQ_LENGTH_CAP)
        values["max_seq_length"] = min(cap, max(64, math.ceil(longest_example_tokens / 64) * 64))
    max_seq_length = values.get("max_seq_length", hp.max_seq_length)
    if hp.warmup_ratio == AUTO:
        values["warmup_ratio"] = 0.03
    if hp.weight_decay == AUTO:
        values["weight_decay"] = 0.0
    if hp.gradient_accumulation_steps == AUTO:
        micro = math.ceil(batch_size * max_seq_length / MICRO_BATCH_TOKEN_BUDGET)
        if micro_batch_examples:
            micro = max(micro, math.ceil(batch_size / micro_batch_examples))
        values["gradient_accumulation_steps"] = max(1, min(batch_size, micro))
    if hp.checkpoint_every_steps == AUTO:
        values["checkpoint_every_steps"] = math.ceil(n / batch_size)
    if getattr(hp, "precision", None) == AUTO:
        values["precision"] = "bf16" if device_type == "cuda" and bf16_supported else "fp32"
    if getattr(hp, "gradient_checkpointing", None) == AUTO:
        values["gradient_checkpointing"] = bool(checkpointing) and getattr(hp, "dp", None) is None
    dp = getattr(hp, "dp", None)
    if dp is not None and dp.delta == AUTO:
        values["dp"] = dataclasses.replace(dp, delta=min(DP_AUTO_DELTA_CAP, 1 / (10 * n)))

    resolved = dataclasses.replace(hp, **values)
    problems = []
    if resolved.gradient_accumulation_steps > resolved.batch_size:
        problems.append(
            (
                f"{_prefix(hp.method)}.gradient_accumulation_steps",
                f"must not exceed batch_size ({resolved.batch_size}); got {resolved.gradient_accumulation_steps}",
            )
        )
    if context_length and resolved.max_seq_length > context_length:
        problems.append(
            (
                f"{_prefix(hp.method)}.max_seq_length",
                f"must not exceed the model's context length ({context_length}); got {resolved.max_seq_length}",
            )
        )
    if problems:
        raise HyperparameterError(problems)
    return resolved


def hyperparameters_from_dict(method: str, values: Mapping[str, Any]) -> Hyperparameters:
    """Rebuild hyperparameters from :meth:`to_dict` output (e.g. stored in a checkpoint)."""
    return HYPERPARAMETERS[method](**values)


def _to_dict(hp: Hyperparameters) -> dict[str, Any]:
    out = dataclasses.asdict(hp)
    if isinstance(out["target_modules"], tuple):
        out["target_modules"] = list(out["target_modules"])
    return out


def _check_common(hp: Hyperparameters, prefix: str) -> list[tuple[str, str]]:
    """Every problem with the fields both methods share, in field order."""
    check = FieldChecks(hp, at_least="an integer of at least")
    check.int_in("n_epochs", 1, 100)
    check.int_in("batch_size", 1, 1024)
    check.number("learning_rate", "a number greater than 0 and at most 1", lambda v: 0 < v <= 1)
    if not _is_number(hp.learning_rate):  # with learning_rate set the multiplier is derived from it (resolve)
        check.number("learning_rate_multiplier", "a number greater than 0 and at most 100", lambda v: 0 < v <= 100)
    if (
        _is_number(hp.learning_rate)
        and _is_number(hp.learning_rate_multiplier)
        and not math.isclose(hp.learning_rate, BASE_LEARNING_RATE * hp.learning_rate_multiplier, rel_tol=1e-9)
    ):
        check.bad("learning_rate_multiplier", "must be \"auto\" when learning_rate is set (set one or the other)")
    check.int_in("lora_r", 1, 256)
    check.number("lora_alpha", "a number greater than 0", lambda v: v > 0)
    # The form's hints say the same ranges: dropout or warm-up over half the run is almost surely a slip.
    check.number("lora_dropout", "a number from 0 to 0.5", lambda v: 0 <= v <= 0.5)
    _check_target_modules(hp, prefix, check.problems)
    check.int_in("max_seq_length", 16, 131072)
    check.number("warmup_ratio", "a number from 0 to 0.5", lambda v: 0 <= v <= 0.5)
    check.number("weight_decay", "a number from 0 to 1", lambda v: 0 <= v <= 1)
    check.int_in("gradient_accumulation_steps", 1, 1024)
    if (
        _is_int(hp.gradient_accumulation_steps)
        and _is_int(hp.batch_size)
        and hp.gradient_accumulation_steps > hp.batch_size
    ):
        check.bad("gradient_accumulation_steps", f"must not exceed batch_size ({hp.batch_size})")
    value = hp.checkpoint_every_steps
    if value != AUTO and (not _is_int(value) or value < 0):
        check.bad("checkpoint_every_steps", "must be a non-negative integer (0 = no checkpoints) or \"auto\"")
    check.int_in("seed", 0, 2**31 - 1, auto=False)
    return check.problems


def _parse_dp(value: Any, prefix: str) -> tuple[Any, list[tuple[str, str]]]:
    """``dp`` as :class:`DifferentialPrivacy` (from an object or an instance) and its problems; ``None`` stays."""
    if value is None:
        return None, []
    if isinstance(value, DifferentialPrivacy):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        return value, [(prefix, f"must be an object {{epsilon, delta, max_grad_norm}} or null; got {value!r:.60}")]
    known = [f.name for f in dataclasses.fields(DifferentialPrivacy)]
    problems = [(f"{prefix}.{key}", f"is not a known field; known: {', '.join(sorted(known))}")
                for key in value if key not in known]
    epsilon = value.get("epsilon")
    if "epsilon" not in value:
        problems.append((f"{prefix}.epsilon", "is required: the privacy budget, e.g. 8"))
    elif not _is_number(epsilon) or epsilon <= 0:
        problems.append((f"{prefix}.epsilon", f"must be a number greater than 0; got {epsilon!r}"))
    delta = value.get("delta", AUTO)
    if delta != AUTO and (not _is_number(delta) or not 0 < delta < 1):
        problems.append((f"{prefix}.delta", f"must be a number between 0 and 1 (exclusive) or \"auto\"; got {delta!r}"))
    norm = value.get("max_grad_norm", 1.0)
    if not _is_number(norm) or norm <= 0:
        problems.append((f"{prefix}.max_grad_norm", f"must be a number greater than 0; got {norm!r}"))
    if problems:
        return value, problems
    return DifferentialPrivacy(
        epsilon=float(epsilon), delta=delta if delta == AUTO else float(delta), max_grad_norm=float(norm)
    ), []


def _check_target_modules(hp: Hyperparameters, prefix: str, problems: list[tuple[str, str]]) -> None:
    value = hp.target_modules
    if value == AUTO:
        return
    field = f"{prefix}.target_modules"
    if not isinstance(value, tuple) or not value:
        problems.append((field, f"must be a non-empty list of module names or \"auto\"; got {value!r}"))
        return
    for i, name in enumerate(value):
        if not isinstance(name, str) or not _MODULE_NAME_RE.match(name):
            problems.append((f"{field}[{i}]", f"must be a module name such as 'q_proj'; got {name!r}"))
        elif name.rsplit(".", 1)[-1] in FORBIDDEN_TARGET_MODULES:
            problems.append(
                (
                    f"{field}[{i}]",
                    f"must not be an embedding or the output head (vLLM refuses such adapters); got {name!r}",
                )
            )
    if len(set(value)) != len(value):
        problems.append((field, f"must not repeat a module; got {list(value)!r}"))
