import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from appliance.modelstore import build_tiny_causal_lm, hash_model_dir


def test_tiny_model_is_fast_deterministic_and_loads(tmp_path):
    start = time.perf_counter()
    a = build_tiny_causal_lm(tmp_path / "a", seed=0)
    assert time.perf_counter() - start < 5
    b = build_tiny_causal_lm(tmp_path / "b", seed=0)
    c = build_tiny_causal_lm(tmp_path / "c", seed=1)
    assert hash_model_dir(a) == hash_model_dir(b) != hash_model_dir(c)

    model = AutoModelForCausalLM.from_pretrained(a, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(a, local_files_only=True)
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    assert model.num_parameters() < 200_000
    assert len(tokenizer) == model.config.vocab_size
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("The quick brown fox")["input_ids"]) == "The quick brown fox"
