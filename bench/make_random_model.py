"""Materialise a model of a given shape with random weights (for GPU checks where the real weights
cannot be carried): ``python bench/make_random_model.py CONFIG_DIR OUT_DIR``.

CONFIG_DIR holds config.json and the tokenizer files; OUT_DIR gets a normal Hugging Face directory.
The weights are random: throughput and memory figures are meaningful, generated text is not.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(src: Path, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for f in src.iterdir():
        if f.name != "config.json" and f.is_file():
            shutil.copy(f, dest / f.name)
    (dest / "RANDOM_WEIGHTS.txt").write_text("Random weights of the real shape; for speed and memory checks only.\n")
    print(f"wrote {sum(p.numel() for p in model.parameters()):,} random parameters to {dest}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
