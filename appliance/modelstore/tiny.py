"""A tiny, seeded Llama for tests: builds in well under a second, no hub.

The tokenizer is a byte-level BPE trained on a fixed corpus with the
``tokenizers`` library (deterministic, ~512 tokens), with ChatML special
tokens and a ChatML chat template, so chat, prompt/completion and text
records all tokenise as they would for a real instruct model.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
You are a helpful assistant. Answer the question briefly and politely. Thank you for asking!
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Please summarise the following text in one sentence. Translate this sentence into French, then German.
Reverse the list of words. Sort these numbers from smallest to largest: 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5.
Count the words in this sentence. Write a short poem about the sea, the sky and the mountains.
The user asked a question and the assistant gave an answer. Here is the answer you asked for.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Symbols: ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ! ? . , ; : ' "
system user assistant hello world yes no maybe colour color red green blue yellow black white
monday tuesday wednesday thursday friday saturday sunday january february march april may june
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_tiny_tokenizer(vocab_size: int = 512):
    """A deterministic byte-level BPE tokenizer with ChatML tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


#: ``model_type``s :func:`build_tiny_causal_lm` builds, each as its released models are shaped.
TINY_MODEL_TYPES = ("llama", "gemma2", "gemma3_text", "phi3")


def build_tiny_causal_lm(dest_dir: Path, seed: int = 0, *, head_dim: int = 16, model_type: str = "llama") -> Path:
    """Write a tiny randomly initialised causal LM with a real tokenizer to ``dest_dir``.

    Two layers, hidden size 64, grouped-query attention: for ``llama`` tied
    embeddings, the same shape of model as SmolLM2, small enough for a training
    step in milliseconds. The other ``model_type``s keep what sets their family
    apart: Gemma 2's soft-capped attention scores and logits and its alternating
    sliding-window layers, Gemma 3's query/key norms and sliding-window layers
    (text-only ``Gemma3ForCausalLM``), Phi-3's fused ``qkv_proj`` and
    ``gate_up_proj`` and untied head. Sliding windows are 16 tokens, so that
    short test examples already cross them. Same arguments, same bytes.

    Args:
        dest_dir: Directory to write (created if needed).
        seed: Seeds the weight initialisation.
        head_dim: Size of an attention head; vLLM's CPU attention takes 32 and up (16 is smaller
            and faster, for everything but a real vLLM). Phi-3 derives it (64 / 4 heads = 16).
        model_type: One of :data:`TINY_MODEL_TYPES`.

    Returns:
        ``dest_dir``, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ValueError: ``model_type`` is not one of :data:`TINY_MODEL_TYPES`.
    """
    import torch
    import transformers

    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(f"`model_type` must be one of {', '.join(TINY_MODEL_TYPES)}; got {model_type!r}")
    dest_dir = Path(dest_dir)
    tokenizer = build_tiny_tokenizer()
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    gemma = {"head_dim": head_dim, "sliding_window": 16, "tie_word_embeddings": True}
    layer_types = ["sliding_attention", "full_attention"]
    config_name, class_name, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"head_dim": head_dim, "tie_word_embeddings": True}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**gemma, "layer_types": layer_types}),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**gemma, "layer_types": layer_types}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 16, "tie_word_embeddings": False}),
    }[model_type]
    # Looked up by name: transformers imports only this family's modelling code.
    model_class = getattr(transformers, class_name)
    config = getattr(transformers, config_name)(**{**common, **extra})
    config.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(dest_dir)
    tokenizer.save_pretrained(dest_dir)
    return dest_dir
