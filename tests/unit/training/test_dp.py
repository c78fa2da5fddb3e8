"""Differentially private LoRA (DP-SGD through Opacus): validation, per-example gradients, a real run."""

import contextlib

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from appliance.errors import InvalidRequestError
from appliance.training import (
    DifferentialPrivacy,
    HyperparameterError,
    LoraHyperparameters,
    TrainingSpec,
    resolve,
    train,
)
from appliance.training import dp as dp_module
from appliance.training.data import tokenize_records
from appliance.training.packing import pack, packed_loss_sum
from appliance.training.recipes import lora

from .conftest import make_spec, reverse_records, write_adapter

P = "method.lora.hyperparameters."
TEXTS = ["the quick brown fox", "hello world yes no", "red green blue sea sky", "lazy dog jumps over"]
TRAIN = [{"text": TEXTS[i % len(TEXTS)]} for i in range(128)]
VAL = [{"text": text} for text in TEXTS]
# Poisson rate 64/128 = 0.5, 2 steps per epoch, 8 steps; two micro-batches per step.
HP = {"n_epochs": 4, "batch_size": 64, "learning_rate": 2e-2, "lora_r": 4, "gradient_accumulation_steps": 2,
      "checkpoint_every_steps": 4, "dp": {"epsilon": 8}}


def test_dp_problems_are_reported_with_the_others():
    with pytest.raises(HyperparameterError) as info:
        make_spec("lora", lora_r=-1, dp={"epsilon": 0, "delta": 1.5, "max_grad_norm": -1, "sigma": 2})
    problems = dict(info.value.problems)
    assert problems[P + "lora_r"].endswith("got -1")
    assert problems[P + "dp.epsilon"] == "must be a number greater than 0; got 0"
    assert problems[P + "dp.delta"] == 'must be a number between 0 and 1 (exclusive) or "auto"; got 1.5'
    assert problems[P + "dp.max_grad_norm"] == "must be a number greater than 0; got -1"
    assert problems[P + "dp.sigma"] == "is not a known field; known: delta, epsilon, max_grad_norm"
    assert len(problems) == 5
    with pytest.raises(HyperparameterError, match=r"dp.epsilon: is required"):
        make_spec("lora", dp={})
    with pytest.raises(HyperparameterError, match=r"dp: must be an object \{epsilon, delta, max_grad_norm\} or null"):
        make_spec("lora", dp="yes")


def test_qlora_refuses_dp_with_a_reason():
    with pytest.raises(HyperparameterError) as info:
        make_spec("qlora", dp={"epsilon": 8})
    assert info.value.problems == [(
        "method.qlora.hyperparameters.dp",
        "is not supported with QLoRA (its activation checkpointing re-runs forward passes, which Opacus' "
        "per-example gradients cannot follow); use method.type 'lora' for differential privacy",
    )]


def test_dp_defaults_auto_delta_and_round_trip():
    spec = make_spec("lora", dp={"epsilon": 8})
    assert spec.hyperparameters.dp == DifferentialPrivacy(epsilon=8.0, delta="auto", max_grad_norm=1.0)
    assert make_spec("lora").hyperparameters.dp is None and make_spec("lora", dp=None).hyperparameters.dp is None

    def resolved(n):
        return resolve(spec.hyperparameters, n_train_examples=n, longest_example_tokens=50, context_length=512,
                       default_target_modules=("q_proj",))

    assert resolved(1000).dp.delta == 1e-5  # capped
    assert resolved(1_000_000).dp.delta == pytest.approx(1e-7)  # 1 / (10 n)
    hp = resolved(1000)
    assert hp.to_dict()["dp"] == {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}
    assert LoraHyperparameters(**hp.to_dict()) == hp
    assert TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": hp.to_dict()}}).hyperparameters == hp


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_example_gradients_are_each_examples_own(tiny_model_dir, tokenizer):
    """Opacus' hooks on peft's LoRA layers, over right-padded rows, give what each example alone gives."""
    from opacus.grad_sample import GradSampleHooks

    hp = resolve(LoraHyperparameters(lora_r=4, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]),
                 n_train_examples=3, longest_example_tokens=64, context_length=512, default_target_modules=())
    setup = lora.setup(tiny_model_dir, hp, torch.device("cpu"))
    setup.model.train()
    params = {n: p for n, p in setup.model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A's gradients trivially zero
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    examples = tokenize_records(reverse_records(3, seed=7), tokenizer, param="x")
    assert len({len(e) for e in examples}) == 3  # different lengths: padding is exercised
    causal_lm = setup.model.get_base_model()
    expected = []
    for example in examples:
        loss = dp_module.example_losses(causal_lm, [example], setup.device)[0]
        expected.append(torch.autograd.grad(loss, list(params.values())))
    hooks = GradSampleHooks(setup.model, loss_reduction="sum")
    dp_module.example_losses(causal_lm, examples, setup.device).sum().backward()
    for j, p in enumerate(params.values()):
        assert p.grad_sample.shape == (3, *p.shape)
        for i in range(3):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)
    hooks.cleanup()


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dp_module, "_fresh_seed", lambda: 1234)  # reproducible noise and sampling for the test
        events, checkpoints = [], {}
        result = train(make_spec("lora", **HP), tiny_model_dir, TRAIN, VAL, on_event=events.append,
                       on_checkpoint=checkpoints.__setitem__, event_every_steps=1)
    return result, events, checkpoints


def test_dp_run_learns_within_its_budget(dp_run):
    result, events, _ = dp_run
    m = result.metrics
    assert result.status == "succeeded" and m.steps == m.total_steps == 8
    assert m.valid_loss_after < m.valid_loss_before - 0.1
    report = result.privacy["dp"]
    assert 0 < report["epsilon_spent"] <= report["epsilon_target"] == 8.0
    assert report["epsilon_spent"] > 7.5  # the noise is calibrated to spend the budget, not far less
    assert report["delta"] == 1e-5 and result.hyperparameters.dp.delta == 1e-5
    assert report["sample_rate"] == 0.5 and report["steps"] == 8 and report["max_grad_norm"] == 1.0
    assert report["accountant"] == "rdp" and report["noise_multiplier"] > 0.5
    info = [e.message for e in events if e.type == "info" and not e.message.startswith("memory plan:")]
    assert len(info) == 1 and f"noise multiplier {report['noise_multiplier']:.4g}" in info[0]
    # Poisson batches vary in size, so the tokens of a step vary too.
    tokens = [e.trained_tokens for e in events if e.type == "train"]
    steps = {b - a for a, b in zip([0, *tokens], tokens)}
    assert len(steps) > 1


def test_dp_adapter_loads_in_stock_peft_with_the_trained_weights(dp_run, tiny_model_dir, tokenizer, tmp_path):
    result, _, _ = dp_run
    directory = write_adapter(result.adapter, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    model = PeftModel.from_pretrained(base, directory)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())
    saved = load_safetensors(result.adapter["adapter_model.safetensors"])
    assert all(torch.equal(p, saved[n.replace(".default.", ".")]) for n, p in lora_b.items())
    # The loaded adapter reproduces the validation loss the run measured with its own weights.
    batch = pack(tokenize_records(VAL, tokenizer, param="val"))
    with torch.no_grad():
        loss = packed_loss_sum(model.get_base_model(), batch).item() / batch.n_targets
    assert loss == pytest.approx(result.metrics.valid_loss_after, rel=1e-5)


def test_dp_resume_continues_the_accounting(dp_run, tiny_model_dir, monkeypatch):
    full, _, checkpoints = dp_run
    monkeypatch.setattr(dp_module, "_fresh_seed", lambda: 99)
    assert sorted(checkpoints) == [4]
    resumed = train(make_spec("lora", **HP), tiny_model_dir, TRAIN, VAL, resume_from=checkpoints[4])
    assert resumed.status == "succeeded" and resumed.metrics.steps == 8
    assert resumed.privacy["dp"]["steps"] == 8
    assert resumed.privacy["dp"]["epsilon_spent"] == full.privacy["dp"]["epsilon_spent"]
    assert resumed.metrics.valid_loss_after < resumed.metrics.valid_loss_before
    with pytest.raises(InvalidRequestError, match="hyperparameters differ"):
        train(make_spec("lora", **{**HP, "dp": {"epsilon": 4}}), tiny_model_dir, TRAIN, VAL,
              resume_from=checkpoints[4])


def test_dp_batch_must_not_exceed_the_data(tiny_model_dir):
    with pytest.raises(HyperparameterError, match="must not exceed the 4 training examples when `dp` is set") as info:
        train(make_spec("lora", batch_size=8, dp={"epsilon": 8}), tiny_model_dir, TRAIN[:4], VAL)
    assert info.value.param == P + "batch_size"


def small_setup(model_dir, epsilon=8.0):
    """A LoRA setup and resolved hyperparameters for 4 examples in batches of 4: sampling rate 1, fast to account."""
    hp = resolve(LoraHyperparameters(lora_r=2, batch_size=4, dp={"epsilon": epsilon}), n_train_examples=4,
                 longest_example_tokens=64, context_length=512, default_target_modules=("q_proj", "v_proj"))
    setup = lora.setup(model_dir, hp, torch.device("cpu"))
    return setup, hp, torch.optim.AdamW([p for p in setup.model.parameters() if p.requires_grad], lr=1e-2)


def test_lost_updates_are_caught_not_shipped(tiny_model_dir):
    """The opacus#820 failure modes: an optimizer on other tensors, an adapter that is not the trained one."""
    setup, hp, optimizer = small_setup(tiny_model_dir)
    stale = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for g in optimizer.param_groups
                               for p in g["params"]], lr=1e-3)
    with pytest.raises(RuntimeError, match="would not update the LoRA weights it saves"):
        dp_module.DpTraining(setup, stale, hp, n_train=4, total_steps=4)

    setup, hp, optimizer = small_setup(tiny_model_dir)
    dp = dp_module.DpTraining(setup, optimizer, hp, n_train=4, total_steps=4)
    adapter = lora.save(setup, "tiny")
    dp.verify(adapter)  # no step taken yet, and the bytes are the live weights
    tensors = load_safetensors(adapter["adapter_model.safetensors"])
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    with pytest.raises(RuntimeError, match="differs from the trained weights"):
        dp.verify({**adapter, "adapter_model.safetensors": save_safetensors(tensors)})
    dp._lr_applied = 1.0  # as if a step with a learning rate had run and changed nothing
    with pytest.raises(RuntimeError, match="never changed during DP training"):
        dp.verify(adapter)
    dp.close()


def test_an_empty_poisson_batch_is_a_noise_only_step(tiny_model_dir):
    setup, hp, optimizer = small_setup(tiny_model_dir)
    dp = dp_module.DpTraining(setup, optimizer, hp, n_train=4, total_steps=4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    loss, tokens = dp.step(setup, [], scheduler, contextlib.nullcontext)
    assert loss is None and tokens == 0 and dp.steps == 1
    assert all(not torch.equal(p, before[n]) for n, p in setup.model.named_parameters() if p.requires_grad)
    assert dp.sample() == [0, 1, 2, 3]  # rate 1: everyone, every step
    dp.close()


def test_an_unreachable_epsilon_is_refused(tiny_model_dir):
    setup, hp, optimizer = small_setup(tiny_model_dir, epsilon=1e-9)
    with pytest.raises(HyperparameterError, match="is out of reach for 4 steps at sampling rate 1") as info:
        dp_module.DpTraining(setup, optimizer, hp, n_train=4, total_steps=4)
    assert info.value.param == P + "dp.epsilon"
