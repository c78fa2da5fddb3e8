import pytest

from appliance.errors import InvalidRequestError
from appliance.training import HYPERPARAMETERS, HyperparameterError, LoraHyperparameters, QloraHyperparameters, TrainingSpec, resolve

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve_for(hp, n=1000, longest=300, context=8192, **kw):
    return resolve(
        hp, n_train_examples=n, longest_example_tokens=longest, context_length=context,
        default_target_modules=PROJECTIONS, **kw,
    )


def test_every_problem_is_reported_at_once_naming_field_and_value():
    with pytest.raises(HyperparameterError) as info:
        TrainingSpec.from_method(
            {
                "type": "lora",
                "lora": {
                    "hyperparameters": {
                        "lora_r": -4, "n_epochs": "many", "learning_rate": 0, "lora_dropout": 1.5,
                        "batch_size": True, "target_modules": ["q_proj", "lm_head"], "precision": "fp16",
                        "lora_rank": 8, "max_seq_length": 4.5,
                    }
                },
            }
        )
    problems = dict(info.value.problems)
    p = "method.lora.hyperparameters."
    assert problems[p + "lora_r"].startswith("must be a positive integer") and problems[p + "lora_r"].endswith("got -4")
    assert problems[p + "n_epochs"].endswith("got 'many'")
    assert problems[p + "learning_rate"].endswith("got 0")
    assert problems[p + "lora_dropout"].endswith("got 1.5") and "from 0 to 0.5" in problems[p + "lora_dropout"]
    assert problems[p + "batch_size"].endswith("got True")
    assert "vLLM refuses" in problems[p + "target_modules[1]"]
    assert problems[p + "precision"] == "must be one of 'auto', 'fp32', 'bf16'; got 'fp16'"
    assert "not a known hyperparameter" in problems[p + "lora_rank"]
    assert problems[p + "max_seq_length"].endswith("got 4.5")
    assert len(problems) == 9
    assert isinstance(info.value, InvalidRequestError) and info.value.param == info.value.problems[0][0]
    assert "method.lora.hyperparameters.lora_r: must be a positive integer" in info.value.message


def test_method_object_parsing():
    assert TrainingSpec.from_method(None) == TrainingSpec("lora", LoraHyperparameters())
    spec = TrainingSpec.from_method({"type": "qlora", "qlora": {"hyperparameters": {"lora_r": 8, "n_epochs": "auto"}}})
    assert spec.method == "qlora" and spec.hyperparameters == QloraHyperparameters(lora_r=8)
    with pytest.raises(HyperparameterError, match="method.type: must be one of 'lora', 'qlora'; got 'dpo'"):
        TrainingSpec.from_method({"type": "dpo"})
    with pytest.raises(HyperparameterError) as info:
        TrainingSpec.from_method({"type": "qlora", "lora": {}, "qlora": {"hyperparameters": {"precision": "bf16"}}})
    assert [p for p, _ in info.value.problems] == ["method.lora", "method.qlora.hyperparameters.precision"]
    assert set(HYPERPARAMETERS) == {"lora", "qlora"}


def test_learning_rate_and_multiplier_are_exclusive():
    with pytest.raises(HyperparameterError, match="learning_rate_multiplier: must be \"auto\" when learning_rate is set"):
        LoraHyperparameters(learning_rate=1e-3, learning_rate_multiplier=2)
    assert resolve_for(LoraHyperparameters(learning_rate_multiplier=2)).learning_rate == pytest.approx(4e-4)
    resolved = resolve_for(LoraHyperparameters(learning_rate=1e-3))
    assert resolved.learning_rate == 1e-3 and resolved.learning_rate_multiplier == pytest.approx(5)
    # a learning rate accepted at creation (up to 1) resolves to a multiplier over 100: still valid once resolved
    # (the worker re-validates the resolved values; it used to refuse what the job's creation had accepted)
    high = resolve_for(LoraHyperparameters(learning_rate=0.05))
    assert high.learning_rate_multiplier == pytest.approx(250)
    assert LoraHyperparameters(**{k: v for k, v in high.to_dict().items() if k != "method"}).learning_rate == 0.05
    with pytest.raises(HyperparameterError, match="learning_rate_multiplier: must be a number greater than 0"):
        LoraHyperparameters(learning_rate_multiplier=250)  # given alone, the multiplier keeps its range


def test_auto_rules():
    r = resolve_for(LoraHyperparameters(), n=1000, longest=300)
    assert r == LoraHyperparameters(
        n_epochs=3, batch_size=4, learning_rate=2e-4, learning_rate_multiplier=1.0, lora_r=16, lora_alpha=32.0,
        lora_dropout=0.05, target_modules=PROJECTIONS, max_seq_length=320, warmup_ratio=0.03, weight_decay=0.0,
        gradient_accumulation_steps=1, checkpoint_every_steps=250, seed=0, precision="fp32",
        gradient_checkpointing=False,
    )
    assert "auto" not in r.to_dict().values()
    # Small sets train for more epochs, huge ones for fewer; batch grows with the data.
    assert resolve_for(LoraHyperparameters(), n=10).n_epochs == 10
    assert resolve_for(LoraHyperparameters(), n=2).n_epochs == 25
    assert resolve_for(LoraHyperparameters(), n=20000).n_epochs == 1
    assert resolve_for(LoraHyperparameters(), n=5000).batch_size == 16
    assert resolve_for(LoraHyperparameters(), n=100_000).batch_size == 32
    assert resolve_for(LoraHyperparameters(), n=3).batch_size == 3
    # Sequence length follows the data, capped by 2048 and the model's context.
    assert resolve_for(LoraHyperparameters(), longest=10).max_seq_length == 64
    assert resolve_for(LoraHyperparameters(), longest=5000).max_seq_length == 2048
    assert resolve_for(LoraHyperparameters(), longest=5000, context=512).max_seq_length == 512
    # Micro-batches stay under 16k tokens.
    assert resolve_for(LoraHyperparameters(batch_size=32, max_seq_length=2048)).gradient_accumulation_steps == 4
    assert resolve_for(LoraHyperparameters(lora_r=8)).lora_alpha == 16
    assert resolve_for(LoraHyperparameters(), device_type="cuda", bf16_supported=True).precision == "bf16"
    assert resolve_for(QloraHyperparameters()).target_modules == PROJECTIONS


def test_resolution_checks_against_the_model():
    with pytest.raises(HyperparameterError, match="max_seq_length: must not exceed the model's context length \\(512\\); got 1024"):
        resolve_for(LoraHyperparameters(max_seq_length=1024), context=512)
    with pytest.raises(HyperparameterError, match="gradient_accumulation_steps: must not exceed batch_size"):
        LoraHyperparameters(batch_size=2, gradient_accumulation_steps=4)


def test_round_trip_through_dict():
    hp = resolve_for(QloraHyperparameters(target_modules=["q_proj", "v_proj"]))
    assert hp.target_modules == ("q_proj", "v_proj")
    assert QloraHyperparameters(**hp.to_dict()) == hp
    assert hp.to_dict()["target_modules"] == ["q_proj", "v_proj"]


def test_the_memory_plan_sets_micro_batches_and_checkpointing_left_to_auto():
    planned = resolve_for(LoraHyperparameters(batch_size=16), n=1000, longest=300)
    assert planned.gradient_accumulation_steps == 1 and planned.gradient_checkpointing is False
    from appliance.training.hyperparameters import resolve

    r = resolve(LoraHyperparameters(batch_size=16), n_train_examples=1000, longest_example_tokens=300,
                context_length=None, default_target_modules=PROJECTIONS, micro_batch_examples=3, checkpointing=True)
    assert r.gradient_accumulation_steps == 6 and r.gradient_checkpointing is True  # ceil(16 / 3)
    chosen = resolve(LoraHyperparameters(batch_size=16, gradient_accumulation_steps=2, gradient_checkpointing=False),
                     n_train_examples=1000, longest_example_tokens=300, context_length=None,
                     default_target_modules=PROJECTIONS, micro_batch_examples=3, checkpointing=True)
    assert chosen.gradient_accumulation_steps == 2 and chosen.gradient_checkpointing is False  # what was asked


def test_dropout_and_warm_up_take_the_ranges_the_form_hints():
    """The portal's hints say "0 to 0.5"; the server refuses what the hint rules out (0.9 was accepted)."""
    for name in ("lora_dropout", "warmup_ratio"):
        for good in (0, 0.1, 0.5):
            TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": {name: good}}})
        with pytest.raises(HyperparameterError) as info:
            TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": {name: 0.9}}})
        (problem,) = [m for p, m in info.value.problems if p.endswith(name)]
        assert "from 0 to 0.5" in problem and problem.endswith("got 0.9")
