"""Materialise a model of a given shape with random weights (for GPU checks where the real weights
cannot be carried)::

    python bench/make_random_model.py CONFIG_DIR OUT_DIR                      # CONFIG_DIR's own shape
    python bench/make_random_model.py CONFIG_DIR OUT_DIR --like llama-3.2-1b --dtype bf16 --device cuda

CONFIG_DIR holds config.json and the tokenizer files; OUT_DIR gets a normal Hugging Face directory.
``--like`` replaces the shape with a published model's (the tokenizer stays CONFIG_DIR's; a larger
vocabulary than the tokenizer's is harmless). The weights are random: throughput and memory figures
are meaningful, generated text is not.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

#: Published shapes (from each model's config.json on the Hugging Face hub).
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    },
}


def main(src: Path, dest: Path, like: str | None = None, dtype: str = "fp32", device: str = "cpu") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if like is None:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    else:
        tokens = AutoConfig.from_pretrained(src, local_files_only=True)
        config = LlamaConfig(**{k: v for k, v in SHAPES[like].items() if k != "model_type"},
                             bos_token_id=tokens.bos_token_id, eos_token_id=tokens.eos_token_id,
                             pad_token_id=getattr(tokens, "pad_token_id", None))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in src.iterdir():
        # The tokenizer and its friends; never CONFIG_DIR's own weights (it may be a whole model directory).
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model.safetensors") \
                and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy(f, dest / f.name)
    (dest / "RANDOM_WEIGHTS.txt").write_text("Random weights of the real shape; for speed and memory checks only.\n")
    print(f"wrote {sum(p.numel() for p in model.parameters()):,} random parameters ({like or 'own shape'}, {dtype}) "
          f"to {dest}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--like", choices=sorted(SHAPES), help="a published model's shape instead of CONFIG_DIR's")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for 1B+)")
    args = parser.parse_args()
    main(args.config_dir, args.out_dir, args.like, args.dtype, args.device)
