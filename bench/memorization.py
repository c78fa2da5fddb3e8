"""Canary exposure's cost: the previous implementation and ours side by side, on the demo model.

    .venv/bin/python bench/memorization.py                 # 4 canaries on SmolLM2-135M (the demo GGUF)
    .venv/bin/python bench/memorization.py --canaries 2 --model-dir var/models/...

Exposure scores each canary's secret and 512 random secrets, with and without the adapter
(1,026 sequences a canary). The baseline is the implementation before issue 23's change: every
sequence run whole (prompt and secret), logits for every position, a log-softmax over the whole
vocabulary, 32 sequences a batch. Ours runs the canary's shared prompt once and reuses its
key/value cache for every batch of secrets, so only the secrets' tokens go through the model again,
and takes the softmax only where a secret's token is predicted. Both run on the same model with the same fresh LoRA adapter (B = 0, so the figures with and without
it are equal) and must give the same exposures; the script prints both times and the ratio.
Measured on SmolLM2-135M on this machine's CPU: it says nothing about a 7B model on a GPU, where
the output layer is a smaller share of the work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def baseline_sequence_nll(model, tokenizer, prompts, targets, device, batch_size: int = 32) -> list[float]:
    """The implementation before the change (appliance/training/memorization.py at 690e146)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [p + t for p, t in zip(prompts[i : i + batch_size], targets[i : i + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for j, (p, t) in enumerate(zip(prompts[i : i + batch_size], targets[i : i + batch_size])):
            positions = torch.arange(len(p) - 1, len(p) + len(t) - 1)
            picked = logp[j, positions.to(logp.device), torch.tensor(t, device=logp.device)]
            out.append(-float(picked.sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="an imported model directory (default: the demo model)")
    parser.add_argument("--canaries", type=int, default=4)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from appliance.training import memorization
    from bench.train import ensure_demo_model

    model_dir = args.model_dir or ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    canaries = [memorization.canary_text(n + 1, " ".join("314159265"[(n + k) % 9] for k in range(9)))
                for n in range(args.canaries)]
    ours_fn = memorization._sequence_nll
    timings, reports = {}, {}
    for name, fn in (("baseline", baseline_sequence_nll), ("ours", ours_fn)):
        memorization._sequence_nll = fn
        started = time.perf_counter()
        reports[name] = memorization.canary_exposure(model, tokenizer, canaries, torch.device("cpu"), seed=1)
        timings[name] = time.perf_counter() - started
    memorization._sequence_nll = ours_fn
    same = all(abs(a - b) < 1e-3 for a, b in zip(reports["baseline"]["exposure"], reports["ours"]["exposure"]))
    threads = torch.get_num_threads()
    print(f"model {model_dir.name}, {args.canaries} canaries x {memorization.EXPOSURE_CANDIDATES + 1} sequences x 2 "
          f"(with/without the adapter), CPU, {threads} threads")
    print(f"baseline {timings['baseline']:.1f} s   ours {timings['ours']:.1f} s   "
          f"speed-up {timings['baseline'] / timings['ours']:.2f}x   same exposures: {same}")
    if not same:
        raise SystemExit(f"exposures differ: {reports['baseline']['exposure']} vs {reports['ours']['exposure']}")


if __name__ == "__main__":
    main()
