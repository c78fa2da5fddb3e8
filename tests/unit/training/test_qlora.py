import json

import torch
from peft import PeftModel
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM

from appliance.training import train

from .conftest import make_spec, reverse_records, write_adapter


def test_qlora_trains_and_its_adapter_loads_in_stock_peft(tiny_model_dir, tmp_path):
    result = train(
        make_spec("qlora", n_epochs=1, batch_size=8, learning_rate=1e-2, lora_dropout=0.0, checkpoint_every_steps=0),
        tiny_model_dir, reverse_records(24), reverse_records(8, seed=7),
    )
    assert result.status == "succeeded"
    memory = result.details.pop("memory")
    assert result.details == {"quantization": "nf4-double", "compute_dtype": "float32", "gradient_checkpointing": True}
    assert memory["plan"]["activation_checkpointing"] is True and memory["measured_peak_bytes"] > 0
    assert result.metrics.valid_loss_after < result.metrics.valid_loss_before

    config = json.loads(result.adapter["adapter_config.json"])
    assert config["modules_to_save"] is None and config["peft_type"] == "LORA"
    weights = load_safetensors(result.adapter["adapter_model.safetensors"])
    assert all("lm_head" not in k and "embed" not in k for k in weights)

    # A QLoRA adapter applies to the full-precision base with stock peft.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    model = PeftModel.from_pretrained(base, write_adapter(result.adapter, tmp_path / "adapter"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained


def test_gradients_are_the_same_after_an_evaluation(tiny_model_dir, tokenizer):
    # Regression: bitsandbytes repacks CPU 4-bit weights for inference in eval
    # mode, after which backward silently loses gradients through the base layers.
    from appliance.training.data import tokenize_records
    from appliance.training.hyperparameters import resolve
    from appliance.training.packing import pack, packed_loss_sum
    from appliance.training.recipes import qlora

    hp = resolve(
        make_spec("qlora", lora_dropout=0.0).hyperparameters, n_train_examples=4, longest_example_tokens=64,
        context_length=512, default_target_modules=["q_proj", "v_proj", "down_proj"],
    )
    torch.manual_seed(0)
    setup = qlora.setup(tiny_model_dir, hp, torch.device("cpu"))
    lm = setup.model.get_base_model()
    with torch.no_grad():  # make lora_B non-zero so every LoRA weight gets a gradient
        for name, p in setup.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    batch = pack(tokenize_records(reverse_records(4), tokenizer, param="r"))

    def grads():
        setup.model.zero_grad()
        packed_loss_sum(lm, batch).backward()
        return {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}

    before = grads()
    setup.model.eval()
    with torch.no_grad():
        packed_loss_sum(lm, batch)
    setup.model.train()
    after = grads()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)
