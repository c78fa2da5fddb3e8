"""The memory planner's answers for real model shapes, and the published figures it must agree with.

Configs are the models' published ``config.json`` values (shape only). Published memory figures
compared against (each within 20 %):

* LLaMA-Factory's README, "Hardware Requirement" table (estimated GPU memory for LLaMA-family
  models, batch 1, short sequences): LoRA 16-bit 7B 16 GB, 65B 160 GB; QLoRA 4-bit 7B 6 GB, 65B 48 GB.
* The QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314, abstract and section 1): a 65B model
  fine-tunes on a single 48 GB GPU (the table's 48 GB figure is that claim).

The planner models this trainer (fp32 LoRA weights and AdamW moments, peft's fp32 upcast of the
non-quantised weights in QLoRA), so it is compared at the settings those figures assume: one
example of 512 tokens, activation checkpointing on, 16-bit compute.
"""

import re

import pytest

from appliance.errors import InvalidRequestError
from appliance.training import planner
from appliance.training.planner import (
    LOSS_CHUNK_TOKENS,
    Device,
    JobShape,
    ModelShape,
    estimate,
    plan,
    refuse,
)

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False}
LLAMA3_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "vocab_size": 32000}
LLAMA_65B = {"hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64,
             "vocab_size": 32000}
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}

GB = 10**9


def gpu(gb: float, name: str = "") -> Device:
    """A card of ``gb`` GB as CUDA reports its free memory with nothing else on it (about 98 %)."""
    return Device("cuda", int(gb * GB * 0.98), name)


def shape(config: dict) -> ModelShape:
    return ModelShape.from_config(config)


@pytest.mark.parametrize(("config", "billions"), [(LLAMA3_8B, 8.03), (LLAMA3_70B, 70.55), (LLAMA_7B, 6.74),
                                                  (LLAMA_65B, 65.29), (QWEN25_05B, 0.494)])
def test_parameter_counts_match_the_published_sizes(config, billions):
    assert shape(config).n_params / 1e9 == pytest.approx(billions, rel=0.005)


def test_lora_parameters_are_counted_per_projection():
    # Llama-3-8B, rank 16 on all seven projections: 16 * sum(in + out) * 32 layers (peft prints 41,943,040).
    assert shape(LLAMA3_8B).lora_params(16, planner.DEFAULT_TARGETS) == 41_943_040


def test_llama3_8b_lora_fits_one_80gb_gpu_with_checkpointing_for_large_micro_batches():
    s, job = shape(LLAMA3_8B), JobShape(method="lora", max_seq_length=2048, batch_size=16)
    chosen = plan(s, job, gpu(80, "H100 80GB"))
    assert chosen is not None and chosen.estimate.total <= gpu(80).budget
    # 16,384-token micro-batches (the most the trainer packs) need checkpointing on this card ...
    big = {"examples_per_micro_batch": 8}
    assert estimate(s, job, "cuda", checkpointing=False, **big).total > gpu(80).budget
    assert estimate(s, job, "cuda", checkpointing=True, **big).total < gpu(80).budget
    # ... and a job that asks for them without choosing gets checkpointing from the plan.
    fixed = plan(s, JobShape(method="lora", max_seq_length=2048, batch_size=16, micro_batch_examples=8), gpu(80))
    assert fixed.checkpointing and fixed.micro_batch_tokens == 16384


def test_llama3_8b_lora_at_its_context_length_is_refused_on_24gb_with_qlora_suggested():
    s, job = shape(LLAMA3_8B), JobShape(method="lora", max_seq_length=8192, batch_size=8)
    card = gpu(24, "L4")
    assert plan(s, job, card) is None
    error = refuse(s, job, card, field="method.lora.hyperparameters.max_seq_length")
    assert isinstance(error, InvalidRequestError) and error.param == "method.lora.hyperparameters.max_seq_length"
    assert "method.type 'qlora'" in str(error) and "L4 (cuda)" in str(error)
    assert "compute.workers 2 with compute.sharding 'fsdp'" in str(error)
    shorter = int(re.search(r"method\.lora\.hyperparameters\.max_seq_length (\d+) or less", str(error)).group(1))
    assert shorter < 8192 and plan(s, JobShape(method="lora", max_seq_length=shorter, batch_size=8), card) is not None


def test_llama3_8b_lora_with_short_examples_fits_24gb_by_checkpointing():
    """What LLaMA-Factory's table says (7B LoRA 16-bit: 16 GB): short examples do fit a 24 GB card."""
    chosen = plan(shape(LLAMA3_8B), JobShape(method="lora", max_seq_length=1024, batch_size=8), gpu(24))
    assert chosen is not None and chosen.checkpointing


@pytest.mark.parametrize("length", [512, 2048, 8192])
def test_llama3_8b_qlora_fits_24gb(length):
    chosen = plan(shape(LLAMA3_8B), JobShape(method="qlora", max_seq_length=length, batch_size=8), gpu(24))
    assert chosen is not None and chosen.checkpointing


def test_llama3_70b_qlora_fits_one_80gb_gpu_and_lora_needs_fsdp_over_several():
    s = shape(LLAMA3_70B)
    assert plan(s, JobShape(method="qlora", max_seq_length=2048, batch_size=8), gpu(80)) is not None
    lora = JobShape(method="lora", max_seq_length=2048, batch_size=8)
    assert plan(s, lora, gpu(80)) is None
    assert plan(s, JobShape(method="lora", max_seq_length=2048, batch_size=8, workers=8, fsdp=None), gpu(80)).fsdp
    message = str(refuse(s, lora, gpu(80), field="method.lora.hyperparameters.max_seq_length"))
    assert "method.type 'qlora'" in message and "compute.sharding 'fsdp'" in message


@pytest.mark.parametrize(("config", "method", "published_gb"), [
    (LLAMA_7B, "lora", 16), (LLAMA_65B, "lora", 160), (LLAMA_7B, "qlora", 6), (LLAMA_65B, "qlora", 48)])
def test_figures_agree_with_published_tables_within_20_percent(config, method, published_gb):
    job = JobShape(method=method, max_seq_length=512, batch_size=1)
    predicted = estimate(shape(config), job, "cuda", examples_per_micro_batch=1, checkpointing=True).total
    assert predicted / (published_gb * GB) == pytest.approx(1.0, abs=0.20)


def test_qlora_65b_fits_a_48gb_gpu_as_the_qlora_paper_says():
    assert plan(shape(LLAMA_65B), JobShape(method="qlora", max_seq_length=512, batch_size=1), gpu(48)) is not None


def test_fsdp_divides_the_decoder_weights_over_the_ranks():
    s = shape(LLAMA3_70B)
    one = estimate(s, JobShape(workers=1), "cuda", examples_per_micro_batch=1, checkpointing=True).weights
    eight = estimate(s, JobShape(workers=8, fsdp=True), "cuda", examples_per_micro_batch=1, checkpointing=True).weights
    assert eight < one / 5


def test_the_cheapest_plan_skips_checkpointing_when_a_large_micro_batch_fits():
    chosen = plan(shape(QWEN25_05B), JobShape(method="lora", max_seq_length=1024, batch_size=16), gpu(80))
    assert not chosen.checkpointing and chosen.micro_batch_tokens == 16384 and chosen.gradient_accumulation_steps == 1


def test_dp_never_checkpoints_and_pays_for_per_example_gradients():
    s, job = shape(QWEN25_05B), JobShape(method="lora", max_seq_length=512, batch_size=8, dp=True)
    chosen = plan(s, job, gpu(80))
    assert chosen is not None and not chosen.checkpointing
    plain = estimate(s, JobShape(method="lora", max_seq_length=512), "cuda", examples_per_micro_batch=8,
                     checkpointing=False)
    assert estimate(s, job, "cuda", examples_per_micro_batch=8, checkpointing=False).adapter > plain.adapter


def test_the_plan_is_reported_in_full():
    chosen = plan(shape(QWEN25_05B), JobShape(max_seq_length=512, batch_size=8), gpu(24, "RTX 4090"))
    out = chosen.to_dict()
    assert out["predicted_peak_bytes"] == sum(v for k, v in out["breakdown_bytes"].items() if k != "total")
    assert out["micro_batch_tokens"] == 8 * 512 and out["activation_checkpointing"] is False
    assert out["sharding"] == "none" and out["device"]["name"] == "RTX 4090"


def test_a_config_without_the_needed_fields_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="lacks hidden_size") as info:
        ModelShape.from_config({"num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})
    assert info.value.param == "model"


def test_the_planner_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; import appliance.training.planner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gemma2_soft_capping_costs_quadratic_attention_memory_and_a_logit_chunk():
    gemma2_9b = {"hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True,
                 "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    capped, plain = shape(gemma2_9b), shape({**gemma2_9b, "attn_logit_softcapping": None,
                                             "final_logit_softcapping": None})
    assert capped.attention_softcap and capped.logit_softcap and capped.head_dim == 256
    assert capped.n_params / 1e9 == pytest.approx(9.24, rel=0.02)

    def extra(length: int) -> int:
        job = JobShape(max_seq_length=length, batch_size=1)
        a, b = (estimate(s, job, "cuda", examples_per_micro_batch=1, checkpointing=False) for s in (capped, plain))
        assert a.loss - b.loss == LOSS_CHUNK_TOKENS * 256000 * 4
        return a.activations - b.activations

    assert extra(2048) == 2 * 2 * extra(1024)  # twice the tokens, each attending to twice as many
