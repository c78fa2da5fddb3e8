"""Each architecture beyond Llama, end to end on a tiny random model of its shape.

Import into the store, a short LoRA run through the real trainer, the memory
planner's reading of the config, and the adapter served by the embedded engine.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from appliance.modelstore import SUPPORTED_ARCHITECTURES, build_tiny_causal_lm, import_model
from appliance.training import train
from appliance.training.data import tokenize_records
from appliance.training.packing import PACKED_ATTENTION, pack, packed_loss_sum
from appliance.training.planner import ModelShape
from serving.protocol import parse_chat_request
from serving.transformers_engine import EngineConfig, TransformersEngine

from .conftest import make_spec, reverse_records

ARCHITECTURES = {
    "gemma2": ("Gemma2ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gemma3_text": ("Gemma3ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ("Phi3ForCausalLM", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def imported(request, tmp_path_factory):
    """``(model_type, store directory, ModelInfo)`` of a tiny model imported under ``tiny-<model_type>``."""
    root = tmp_path_factory.mktemp(request.param)
    src = build_tiny_causal_lm(root / "src", seed=0, model_type=request.param)
    name = f"tiny-{request.param.replace('_', '-')}"
    return request.param, root / name, import_model(src, root / name, name)


def test_import_describes_the_architecture(imported):
    model_type, model_dir, info = imported
    assert (info.model_type, info.architecture) == (model_type, ARCHITECTURES[model_type][0])
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert info.parameter_count == model.num_parameters()


def test_planner_reads_the_config(imported):
    model_type, model_dir, _ = imported
    config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape.from_config(config)
    assert shape.head_dim == 16 and shape.num_kv_heads == 2
    targets = SUPPORTED_ARCHITECTURES[model_type].default_target_modules
    assert sorted(targets) == sorted(ARCHITECTURES[model_type][1])
    # The planner's LoRA size per target (fused projections included) is peft's.
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=list(targets)))
    assert shape.lora_params(4, targets) == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_lora_trains_and_the_embedded_engine_serves_the_adapter(imported, tmp_path):
    model_type, model_dir, _ = imported
    result = train(
        make_spec("lora", n_epochs=2, batch_size=8, learning_rate=1e-2, checkpoint_every_steps=0),
        model_dir, reverse_records(32), reverse_records(8, seed=99),
    )
    m = result.metrics
    assert result.status == "succeeded" and m.valid_loss_after < m.valid_loss_before
    config = json.loads(result.adapter["adapter_config.json"])
    assert sorted(config["target_modules"]) == sorted(ARCHITECTURES[model_type][1])

    engine = TransformersEngine.from_pretrained(model_dir, device="cpu", config=EngineConfig(default_max_tokens=8))
    with engine:
        engine.load_adapter("reverser", result.adapter)
        body = {"messages": [{"role": "user", "content": "Reverse: red green blue"}], "temperature": 0,
                "max_tokens": 8}
        base = engine.generate(parse_chat_request({"model": model_dir.name, **body}))
        tuned = engine.generate(parse_chat_request({"model": "reverser", **body}))
    assert tuned.usage.completion_tokens > 0 and tuned.choices[0].text != base.choices[0].text


def test_fused_loss_is_the_models_own_loss_with_soft_capped_logits(tmp_path, tokenizer):
    """Gemma 2 soft-caps its logits (and attention scores); the fused loss and its gradient must follow."""
    model_dir = build_tiny_causal_lm(tmp_path / "gemma2", seed=1, model_type="gemma2")
    config = json.loads((model_dir / "config.json").read_text())
    # A cap this low bends the tiny model's logits visibly (the released 30.0 barely would).
    config.update(final_logit_softcapping=0.5, attn_logit_softcapping=1.0)
    (model_dir / "config.json").write_text(json.dumps(config))
    ours = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=PACKED_ATTENTION)
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    for model in (ours, theirs):
        model.lm_head.weight.requires_grad_(False)  # the fused loss takes a frozen head, as in LoRA
    (example,) = tokenize_records(reverse_records(1, seed=3), tokenizer, param="r")
    assert len(example) > 16  # crosses the sliding window of the first layer

    batch = pack([example])
    loss = packed_loss_sum(ours, batch) / batch.n_targets
    reference = theirs(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
    loss.backward()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the cap really bites: every logit lies within it
        assert theirs(input_ids=torch.tensor([example.input_ids])).logits.abs().max() < 0.5
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
