"""Training benchmark: our LoRA recipe vs a plain Hugging Face Trainer + peft baseline.

    python bench/train.py            # full run on SmolLM2-135M (imported from the demo GGUF)
    python bench/train.py --quick    # a small run, a minute or two

Both sides get the same model, the same tokenised examples (same assistant-only
labels, same truncation), the same LoRA config and optimizer hyperparameters,
the same number of epochs and optimizer steps, and see the same tokens in the
same order (the baseline's sampler yields our recipe's shuffle; nothing else of
the stock ``Trainer`` is changed). The
baseline pads each batch to its longest example (``DataCollatorForSeq2Seq``),
does not pack, and computes the loss with the model's own forward, as a stock
``Trainer`` run does. Tokens/s counts real (non-padding) tokens for both, over
the training loop only. Validation loss is measured by the same function for
both. Peak RSS of LoRA and QLoRA is measured in fresh subprocesses running the
same workload for a few steps.

Figures are appended to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.training.trainer import _epoch_order  # noqa: E402
from bench.synthetic import instruction_corpus  # noqa: E402

CACHE = REPO / "bench" / ".cache"
DEMO_DIR = CACHE / "smollm2-135m"
SPEED_TARGET, LOSS_TOLERANCE, MEMORY_TARGET = 2.0, 0.02, 0.6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run (64 examples)")
    parser.add_argument("--model-dir", type=Path, help="an imported model directory (default: the demo model)")
    parser.add_argument("--examples", type=int, help="training examples (default 256, quick 64)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the ours/baseline pair this many times, alternating; medians are reported")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per peak-RSS subprocess")
    parser.add_argument("--no-memory", action="store_true", help="skip the LoRA/QLoRA peak-RSS comparison")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--memory-child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_train = args.examples or (64 if args.quick else 256)
    n_val = max(8, n_train // 8)

    if args.memory_child:
        return memory_child(args, n_train)

    model_dir = args.model_dir or ensure_demo_model()
    print(f"model: {model_dir}", flush=True)
    import torch
    import transformers
    import peft
    import bitsandbytes

    train_records = instruction_corpus(n_train, seed=0)
    val_records = instruction_corpus(n_val, seed=1)
    hp = dict(
        n_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_seq_length=args.max_seq_length, checkpoint_every_steps=0, seed=0, precision="fp32",
    )

    # The machine is shared: alternate the two sides so that load from elsewhere
    # hits both, and report medians.
    ours_runs, base_runs = [], []
    for repeat in range(args.repeats):
        print(f"== ours (appliance.training, LoRA), run {repeat + 1}/{args.repeats} ==", flush=True)
        ours_runs.append(run_ours(model_dir, train_records, val_records, hp))
        print(json.dumps(ours_runs[-1]), flush=True)
        print(f"== baseline (transformers.Trainer + peft, dynamic padding), run {repeat + 1}/{args.repeats} ==", flush=True)
        base_runs.append(run_baseline(model_dir, train_records, val_records, ours_runs[-1]["resolved"]))
        print(json.dumps(base_runs[-1]), flush=True)
    ours, base = median_run(ours_runs), median_run(base_runs)
    if base["tokens"] != ours["tokens"] or base["steps"] != ours["steps"]:
        print("WARNING: the two runs did not see the same tokens/steps", flush=True)

    memory = None
    if not args.no_memory:
        memory = {m: run_memory_child(m, args, model_dir, n_train) for m in ("lora", "qlora")}
        print(json.dumps(memory), flush=True)

    speedup = ours["tokens_per_second"] / base["tokens_per_second"]
    loss_gap = (ours["valid_loss_after"] - base["valid_loss_after"]) / base["valid_loss_after"]
    mem_ratio = memory["qlora"]["peak_rss_mib"] / memory["lora"]["peak_rss_mib"] if memory else None
    lines = [
        f"tokens/s   ours {ours['tokens_per_second']:.0f}   baseline {base['tokens_per_second']:.0f}   "
        f"ratio {speedup:.2f}x (target >= {SPEED_TARGET}x: {'met' if speedup >= SPEED_TARGET else 'NOT met'})",
        f"val loss   ours {ours['valid_loss_after']:.4f}   baseline {base['valid_loss_after']:.4f}   "
        f"(before {ours['valid_loss_before']:.4f}; gap {loss_gap:+.2%}, target within {LOSS_TOLERANCE:.0%}: "
        f"{'met' if abs(loss_gap) <= LOSS_TOLERANCE else 'NOT met'})",
    ]
    if memory:
        lines.append(
            f"peak RSS   LoRA {memory['lora']['peak_rss_mib']:.0f} MiB   QLoRA {memory['qlora']['peak_rss_mib']:.0f} MiB   "
            f"ratio {mem_ratio:.2f} (target <= {MEMORY_TARGET}: {'met' if mem_ratio <= MEMORY_TARGET else 'NOT met'})"
        )
    print("\n".join(lines), flush=True)

    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}"
    )
    record = [
        f"\n## {date} — `bench/train.py{' --quick' if args.quick else ''}`\n",
        f"- machine: {os.cpu_count()} CPU cores ({cpu_name()}), no GPU, {platform.python_version()}; {versions}",
        f"- model: {model_dir.name}; {n_train} train / {n_val} val chat records (synthetic, seed 0/1), "
        f"{ours['steps']} optimizer steps, {ours['tokens']} real tokens; hyperparameters "
        f"{json.dumps({k: ours['resolved'][k] for k in ('n_epochs', 'batch_size', 'learning_rate', 'lora_r', 'lora_alpha', 'lora_dropout', 'max_seq_length', 'warmup_ratio')})}",
        f"- baseline padding efficiency (real / padded tokens): {base['padding_efficiency']:.2f}; "
        f"ours pads nothing (one packed row per micro-batch)",
        f"- runs (alternating, medians in the table): ours tokens/s "
        f"{[round(r['tokens_per_second']) for r in ours_runs]}, baseline "
        f"{[round(r['tokens_per_second']) for r in base_runs]}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (other work shares this machine)",
        "",
        "| | ours | HF Trainer baseline | ratio |",
        "|---|---|---|---|",
        f"| tokens/s (real tokens) | {ours['tokens_per_second']:.0f} | {base['tokens_per_second']:.0f} | {speedup:.2f}x |",
        f"| train loop seconds | {ours['train_seconds']:.1f} | {base['train_seconds']:.1f} | |",
        f"| val loss before → after | {ours['valid_loss_before']:.4f} → {ours['valid_loss_after']:.4f} | "
        f"{base['valid_loss_before']:.4f} → {base['valid_loss_after']:.4f} | {loss_gap:+.2%} |",
    ]
    if memory:
        record.append(
            f"| peak RSS, LoRA vs QLoRA ({args.memory_steps} steps, fresh process) | LoRA {memory['lora']['peak_rss_mib']:.0f} MiB | "
            f"QLoRA {memory['qlora']['peak_rss_mib']:.0f} MiB | {mem_ratio:.2f} |"
        )
    record += ["", "```", *lines, "```"]
    with args.results.open("a") as fh:
        fh.write("\n".join(record) + "\n")
    print(f"appended to {args.results}")
    return 0


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle for an even count)."""
    return sorted(runs, key=lambda r: r["tokens_per_second"])[(len(runs) - 1) // 2]


def ensure_demo_model() -> Path:
    if (DEMO_DIR / "config.json").is_file():
        return DEMO_DIR
    from appliance.modelstore import demo_gguf_path, import_model

    CACHE.mkdir(parents=True, exist_ok=True)
    print("importing the demo GGUF (once, ~20 s)...", flush=True)
    import_model(demo_gguf_path(), DEMO_DIR, "smollm2-135m")
    return DEMO_DIR


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_ours(model_dir: Path, train_records: list, val_records: list, hp: dict) -> dict:
    from appliance.training import TrainingSpec, train

    spec = TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": hp}})
    result = train(spec, model_dir, train_records, val_records, device="cpu", event_every_steps=8,
                   on_event=lambda e: print(f"  {e.type} step {e.step}/{e.total_steps} loss "
                                            f"{e.train_loss or e.valid_loss:.4f}", flush=True))
    m = result.metrics
    return {
        "tokens_per_second": m.tokens_per_second, "tokens": m.trained_tokens, "steps": m.steps,
        "train_seconds": m.train_seconds, "valid_loss_before": m.valid_loss_before,
        "valid_loss_after": m.valid_loss_after, "resolved": result.hyperparameters.to_dict(),
    }


def tokenised(model_dir: Path, records: list, max_len: int):
    from transformers import AutoTokenizer

    from appliance.training.data import tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    examples = [e.truncated(max_len) for e in tokenize_records(records, tokenizer, param="records")]
    return tokenizer, [e for e in examples if e.n_targets > 0]


def eval_loss(causal_lm, examples: list, pad_id: int) -> float:
    """The same measure as our recipe's: summed target-token loss / target tokens."""
    import torch

    from appliance.training.packing import pack, packed_loss_sum

    causal_lm.eval()
    total = count = 0
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            batch = pack(examples[i : i + 16])
            total += packed_loss_sum(causal_lm, batch).item()
            count += batch.n_targets
    return total / count


def run_baseline(model_dir: Path, train_records: list, val_records: list, hp: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

    SameOrderTrainer = _make_same_order_trainer()

    tokenizer, train_set = tokenised(model_dir, train_records, hp["max_seq_length"])
    _, val_set = tokenised(model_dir, val_records, hp["max_seq_length"])
    torch.manual_seed(hp["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=hp["lora_r"], lora_alpha=hp["lora_alpha"], lora_dropout=hp["lora_dropout"],
        target_modules=hp["target_modules"], bias="none", task_type="CAUSAL_LM",
    ))
    pad_id = tokenizer.pad_token_id
    before = eval_loss(model.get_base_model(), val_set, pad_id)
    dataset = [{"input_ids": list(e.input_ids), "attention_mask": [1] * len(e), "labels": list(e.labels)} for e in train_set]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=hp["batch_size"] // hp["gradient_accumulation_steps"],
            gradient_accumulation_steps=hp["gradient_accumulation_steps"], num_train_epochs=hp["n_epochs"],
            learning_rate=hp["learning_rate"], weight_decay=hp["weight_decay"], warmup_steps=hp["warmup_ratio"],
            lr_scheduler_type="linear", max_grad_norm=1.0, seed=hp["seed"], data_seed=hp["seed"],
            save_strategy="no", eval_strategy="no", logging_steps=8, report_to=[], use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        trainer = SameOrderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.order_seed = hp["seed"]
        output = trainer.train()
    seconds = output.metrics["train_runtime"]
    tokens = sum(len(e) for e in train_set) * hp["n_epochs"]

    # Padding the baseline carried: its batches are ours (see SameOrderTrainer), padded to their longest.
    padded = 0
    for epoch in range(hp["n_epochs"]):
        order = _epoch_order(len(train_set), hp["seed"], epoch)
        padded += sum(
            max(len(train_set[j]) for j in order[i : i + hp["batch_size"]]) * len(order[i : i + hp["batch_size"]])
            for i in range(0, len(order), hp["batch_size"])
        )
    return {
        "tokens_per_second": tokens / seconds, "tokens": tokens, "steps": output.global_step,
        "train_seconds": seconds, "valid_loss_before": before,
        "valid_loss_after": eval_loss(model.get_base_model(), val_set, pad_id),
        "padding_efficiency": sum(len(e) for e in train_set) / padded,
    }


class _EpochOrder:
    """A sampler yielding our recipe's shuffled order of each epoch (``set_epoch`` is called by accelerate)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(_epoch_order(self.n, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.n


def _make_same_order_trainer():
    from transformers import Trainer

    class SameOrderTrainer(Trainer):
        """``Trainer`` fed the examples in the order our recipe takes them.

        Everything else is stock. Without this, the two runs differ in which
        examples share a step, and after a few dozen steps at a high learning
        rate that alone moves the final loss by several percent either way,
        which hides what the comparison is about.
        """

        order_seed = 0

        def _get_train_sampler(self, *args, **kwargs):
            return _EpochOrder(len(self.train_dataset), self.order_seed)

    return SameOrderTrainer


def run_memory_child(method: str, args: argparse.Namespace, model_dir: Path, n_train: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--memory-child", method, "--model-dir", str(model_dir),
        "--examples", str(n_train), "--batch-size", str(args.batch_size), "--max-seq-length",
        str(args.max_seq_length), "--memory-steps", str(args.memory_steps), "--learning-rate", str(args.learning_rate),
    ]
    print(f"== peak RSS: {method} in a fresh process ==", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace, n_train: int) -> int:
    """Train ``--memory-steps`` steps of the benchmark workload; print peak RSS (VmHWM) as JSON."""
    from appliance.training import TrainingSpec, train

    steps = args.memory_steps
    records = instruction_corpus(n_train, seed=0)[: steps * args.batch_size]
    hp = dict(n_epochs=1, batch_size=args.batch_size, learning_rate=args.learning_rate,
              max_seq_length=args.max_seq_length, checkpoint_every_steps=0, seed=0)
    spec = TrainingSpec.from_method({"type": args.memory_child, args.memory_child: {"hyperparameters": hp}})
    started = time.perf_counter()
    result = train(spec, args.model_dir, records, instruction_corpus(8, seed=1), device="cpu")
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    print(json.dumps({
        "method": args.memory_child, "peak_rss_mib": peak_kib / 1024, "steps": result.metrics.steps,
        "tokens_per_second": result.metrics.tokens_per_second, "seconds": time.perf_counter() - started,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
