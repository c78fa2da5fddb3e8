import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM

from appliance.errors import InvalidRequestError
from appliance.training import TrainResult, train
from appliance.training.adapter import adapter_files
from appliance.training.data import tokenize_records
from appliance.training.packing import pack, packed_loss_sum

from .conftest import make_spec, reverse_records, write_adapter

FAST = {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "checkpoint_every_steps": 0}


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir) -> tuple[TrainResult, list]:
    events = []
    result = train(
        make_spec("lora", **FAST), tiny_model_dir, reverse_records(80), reverse_records(16, seed=99),
        on_event=events.append, event_every_steps=4,
    )
    return result, events


def test_validation_loss_falls(lora_run):
    result, _ = lora_run
    m = result.metrics
    assert result.status == "succeeded"
    assert m.valid_loss_after < m.valid_loss_before - 0.3
    assert m.valid_perplexity_before == pytest.approx(torch.tensor(m.valid_loss_before).exp().item())
    assert m.n_train_examples == 80 and m.n_valid_examples == 16 and m.steps == m.total_steps == 20
    assert m.trained_tokens > 0 and m.tokens_per_second > 0
    assert result.hyperparameters.precision == "fp32" and result.hyperparameters.lora_r == 16


def test_events_carry_progress(lora_run):
    _, events = lora_run
    train_events = [e for e in events if e.type == "train"]
    assert [e.step for e in train_events] == [4, 8, 12, 16, 20]
    assert all(e.learning_rate is not None and e.tokens_per_second > 0 and e.train_loss > 0 for e in train_events)
    assert train_events[-1].epoch == 2.0 and train_events[-1].trained_tokens > train_events[0].trained_tokens
    assert [e.type for e in events if e.type == "validation"] == ["validation", "validation"]


def test_adapter_loads_in_stock_peft_and_reproduces_the_validation_loss(lora_run, tiny_model_dir, tokenizer, tmp_path):
    result, _ = lora_run
    assert set(result.adapter) == {"adapter_config.json", "adapter_model.safetensors"}
    directory = write_adapter(result.adapter, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    model = PeftModel.from_pretrained(base, directory)
    examples = tokenize_records(reverse_records(16, seed=99), tokenizer, param="val")
    batch = pack(examples)
    with torch.no_grad():
        loss = packed_loss_sum(model.get_base_model(), batch).item() / batch.n_targets
    assert loss == pytest.approx(result.metrics.valid_loss_after, rel=1e-5)


def test_adapter_never_has_modules_to_save_or_head_weights(lora_run):
    result, _ = lora_run
    config = json.loads(result.adapter["adapter_config.json"])
    assert config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == "tiny-llama" and config["inference_mode"] is True
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    keys = load_safetensors(result.adapter["adapter_model.safetensors"]).keys()
    assert keys and all(("lora_A" in k or "lora_B" in k) and "lm_head" not in k and "embed" not in k for k in keys)


def test_head_and_embeddings_are_refused_as_targets(tiny_model_dir):
    for target in ("lm_head", "embed_tokens", "model.embed_tokens"):
        with pytest.raises(InvalidRequestError, match="vLLM refuses"):
            make_spec("lora", target_modules=[target])
    with pytest.raises(InvalidRequestError, match=r"target_modules\[0\]: matches no layer of this model; got 'qkv'") as info:
        train(make_spec("lora", target_modules=["qkv"], n_epochs=1), tiny_model_dir, reverse_records(4))
    assert info.value.param == "method.lora.hyperparameters.target_modules"


def test_adapter_writer_refuses_modules_to_save(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(RuntimeError, match="modules_to_save"):
        adapter_files(model, "tiny")


def test_bf16_precision_trains(tiny_model_dir):
    result = train(
        make_spec("lora", n_epochs=1, batch_size=4, precision="bf16", learning_rate=1e-2, checkpoint_every_steps=0),
        tiny_model_dir, reverse_records(8), reverse_records(4, seed=5),
    )
    assert result.details["base_dtype"] == "bfloat16" and result.metrics.valid_loss_after is not None


def test_no_network_is_needed(tiny_model_dir, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("Network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    result = train(make_spec("lora", n_epochs=1, batch_size=4), tiny_model_dir, reverse_records(8))
    assert result.status == "succeeded"


def test_records_without_targets_after_truncation_are_dropped_with_a_warning(tiny_model_dir):
    long_prompt = {"prompt": "word " * 200, "completion": " end"}
    events = []
    result = train(
        make_spec("lora", n_epochs=1, batch_size=4, max_seq_length=64),
        tiny_model_dir, reverse_records(8) + [long_prompt], reverse_records(2, seed=1), on_event=events.append,
    )
    assert result.metrics.dropped_examples == 1 and result.metrics.n_train_examples == 8
    assert [e.message for e in events if e.type == "warning"] == [
        "1 record(s) dropped: no target tokens within max_seq_length"
    ]
    with pytest.raises(InvalidRequestError, match="no training record has target tokens") as info:
        train(make_spec("lora", max_seq_length=64), tiny_model_dir, [long_prompt])
    assert info.value.param == "method.lora.hyperparameters.max_seq_length"


def test_activation_checkpointing_trains_to_the_same_loss(tiny_model_dir):
    """LoRA with activation checkpointing (the plan's choice, or asked for) computes the same step as without."""
    records, val = reverse_records(24), reverse_records(8, seed=7)
    runs = {}
    for checkpointing in (False, True):
        spec = make_spec("lora", n_epochs=1, batch_size=8, learning_rate=1e-2, checkpoint_every_steps=0,
                         gradient_checkpointing=checkpointing)
        runs[checkpointing] = train(spec, tiny_model_dir, records, val)
    plain, ckpt = runs[False], runs[True]
    assert ckpt.details["gradient_checkpointing"] is True and plain.details["gradient_checkpointing"] is False
    assert ckpt.details["memory"]["plan"]["activation_checkpointing"] is True
    assert ckpt.metrics.train_loss == pytest.approx(plain.metrics.train_loss, rel=1e-5)
    assert ckpt.metrics.valid_loss_after == pytest.approx(plain.metrics.valid_loss_after, rel=1e-5)


def test_the_run_reports_its_memory_plan_beside_the_measured_peak(lora_run):
    result, events = lora_run
    memory = result.details["memory"]
    assert memory["plan"]["predicted_peak_bytes"] > 0 and memory["plan"]["device"]["kind"] == "cpu"
    assert memory["plan"]["activation_checkpointing"] is False  # a tiny model fits without it
    assert memory["measured_peak_bytes"] > 0 and "resident" in memory["measured_how"]
    assert any(e.type == "info" and e.message.startswith("memory plan: predicted peak") for e in events)


def test_checkpointing_is_refused_with_dp():
    from appliance.trainkit.errors import HyperparameterError

    with pytest.raises(HyperparameterError) as info:
        make_spec("lora", gradient_checkpointing=True, dp={"epsilon": 8})
    assert "method.lora.hyperparameters.gradient_checkpointing" in str(info.value)


def test_sample_generations_show_the_base_and_the_fine_tuned_answers(lora_run, tiny_model_dir, tokenizer, tmp_path):
    """Three validation prompts with their reference, answered greedily by the base model and the fine-tuned one:
    the same answers stock transformers and peft give outside the appliance."""
    from appliance.training.samples import MAX_NEW_TOKENS

    result, events = lora_run
    assert len(result.samples) == 3
    assert any(e.message and e.message.startswith("sample generations: 3 validation prompt(s)") for e in events)
    records = reverse_records(16, seed=99)
    directory = write_adapter(result.adapter, tmp_path / "adapter")

    def greedy(model, prompt_ids):
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id
                                 if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True),
                                      directory).eval()
    for sample, record in zip(result.samples, records, strict=False):
        [example] = tokenize_records([record], tokenizer, param="val")
        first = next(i for i, label in enumerate(example.labels) if label != -100)
        prompt = list(example.input_ids[:first])
        assert record["messages"][0]["content"] in sample["prompt"]
        assert sample["reference"] == record["messages"][1]["content"]
        assert sample["before"] == greedy(base, prompt) and sample["after"] == greedy(tuned, prompt)
    assert any(s["before"] != s["after"] for s in result.samples)  # training changed the answers
