"""Training benchmark: our LoRA recipe vs the stock Hugging Face Trainer + peft, two ways.

    python bench/train.py            # full run on SmolLM2-135M (imported from the demo GGUF)
    python bench/train.py --quick    # a small run, a minute or two
    python bench/train.py --device cuda --precision bf16 --model-dir DIR --json out.json   # on a GPU

Three arms, side by side in one run: ours; the Trainer padding each batch to
its longest example (``DataCollatorForSeq2Seq``, the common default); and the
best stock configuration, the Trainer padding-free (``DataCollatorWithFlattening``:
each batch one row, position ids restarting per example, attention kept inside
each example by transformers; FlashAttention-2 on a GPU where installed).

Both sides get the same model, the same tokenised examples (same assistant-only
labels, same truncation), the same LoRA config and optimizer hyperparameters,
the same number of epochs and optimizer steps, and see the same tokens in the
same order (the baseline's sampler yields our recipe's shuffle; nothing else of
the stock ``Trainer`` is changed). The
baselines compute the loss with the model's own forward, as a stock
``Trainer`` run does. Tokens/s counts real (non-padding) tokens for all, over
the training loop only. Validation loss is measured by the same function for
all. Peak memory per arm is the process's peak resident set over the arm
(VmHWM, restarted before it) on a CPU, ``torch.cuda.max_memory_allocated`` on a
GPU. Peak RSS of LoRA and QLoRA is also measured in fresh subprocesses running
the same workload for a few steps.

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
SPEED_TARGET, FLAT_SPEED_TARGET, LOSS_TOLERANCE, MEMORY_TARGET = 2.0, 1.3, 0.02, 0.6
#: Optimizer steps before the steady-state clock starts (compilation, kernel autotuning, allocator growth).
WARMUP_STEPS = 8
ARMS = {"ours": "appliance.training, LoRA, packed", "padded": "transformers.Trainer + peft, dynamic padding",
        "flattening": "transformers.Trainer + peft, DataCollatorWithFlattening (padding-free)"}


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
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--attention", help="our arm's attention kernel instead of the one the recipe picks "
                        "(appliance_packed, flash_attention_2, flex_attention, sdpa): to compare them")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md",
                        help="markdown file the figures are appended to ('-': none)")
    parser.add_argument("--memory-child", choices=["lora", "qlora", "padded", "flattening"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-hp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_train = args.examples or (64 if args.quick else 256)
    n_val = max(8, n_train // 8)

    if args.memory_child:
        return memory_child(args, n_train)

    if args.attention:
        from appliance.training.recipes import lora

        lora.packed_attention = lambda device, dtype: args.attention
    model_dir = args.model_dir or ensure_demo_model()
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    print(f"model: {model_dir}; device {args.device}, {precision}", flush=True)
    import bitsandbytes
    import peft
    import torch
    import transformers

    train_records = instruction_corpus(n_train, seed=0)
    val_records = instruction_corpus(n_val, seed=1)
    hp = dict(
        n_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        max_seq_length=args.max_seq_length, checkpoint_every_steps=0, seed=0, precision=precision,
    )

    # The machine may be shared: alternate the arms so that load from elsewhere hits all, and report medians.
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        for arm, what in ARMS.items():
            print(f"== {arm} ({what}), run {repeat + 1}/{args.repeats} ==", flush=True)
            if arm == "ours":
                runs[arm].append(measured(args.device, lambda: run_ours(model_dir, train_records, val_records, hp,
                                                                         args.device)))
            else:
                resolved = {**runs["ours"][-1]["resolved"], "precision": precision}
                runs[arm].append(measured(args.device, lambda arm=arm, resolved=resolved: run_baseline(
                    model_dir, train_records, val_records, resolved, args.device, flatten=arm == "flattening")))
            print(json.dumps(runs[arm][-1]), flush=True)
    best = {arm: median_run(r) for arm, r in runs.items()}
    ours, base, flat = best["ours"], best["padded"], best["flattening"]
    for arm in ("padded", "flattening"):
        if best[arm]["tokens"] != ours["tokens"] or best[arm]["steps"] != ours["steps"]:
            print(f"WARNING: {arm} and ours did not see the same tokens/steps", flush=True)

    memory = None
    if not args.no_memory:
        resolved = {**ours["resolved"], "precision": precision}
        memory = {m: run_memory_child(m, args, model_dir, n_train, resolved) for m in ("lora", "qlora")}
        if not args.device.startswith("cuda"):  # a CPU's RSS is fair only from a fresh process per arm
            memory.update({m: run_memory_child(m, args, model_dir, n_train, resolved)
                           for m in ("padded", "flattening")})
            for arm, child in (("ours", "lora"), ("padded", "padded"), ("flattening", "flattening")):
                best[arm] = {**best[arm], "peak_memory_mib": memory[child]["peak_rss_mib"],
                             "memory_how": f"peak RSS of a fresh process, {args.memory_steps} steps"}
        print(json.dumps(memory), flush=True)
    ours, base, flat = best["ours"], best["padded"], best["flattening"]

    speedup = ours["tokens_per_second"] / base["tokens_per_second"]
    flat_speedup = ours["tokens_per_second"] / flat["tokens_per_second"]
    loss_gap = (ours["valid_loss_after"] - base["valid_loss_after"]) / base["valid_loss_after"]
    flat_gap = (ours["valid_loss_after"] - flat["valid_loss_after"]) / flat["valid_loss_after"]
    peak_ratio = ours["peak_memory_mib"] / flat["peak_memory_mib"] if flat["peak_memory_mib"] else None
    mem_ratio = memory["qlora"]["peak_rss_mib"] / memory["lora"]["peak_rss_mib"] if memory else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        f"tokens/s   ours {ours['tokens_per_second']:.0f}   padded {base['tokens_per_second']:.0f}   "
        f"padding-free {flat['tokens_per_second']:.0f}",
    ]
    if all(r.get("steady_tokens_per_second") for r in (ours, base, flat)):
        s_ours, s_base, s_flat = (r["steady_tokens_per_second"] for r in (ours, base, flat))
        lines.append(f"steady     after {WARMUP_STEPS} warm-up steps: ours {s_ours:.0f}   padded {s_base:.0f}   "
                     f"padding-free {s_flat:.0f}   (ratios {s_ours / s_base:.2f}x / {s_ours / s_flat:.2f}x)")
    lines += [
        f"ratio      vs padded {speedup:.2f}x (target >= {SPEED_TARGET}x: {verdict(speedup >= SPEED_TARGET)})   "
        f"vs padding-free {flat_speedup:.2f}x (target >= {FLAT_SPEED_TARGET}x: "
        f"{verdict(flat_speedup >= FLAT_SPEED_TARGET)})",
        f"val loss   ours {ours['valid_loss_after']:.4f}   padded {base['valid_loss_after']:.4f}   "
        f"padding-free {flat['valid_loss_after']:.4f}   (before {ours['valid_loss_before']:.4f}; gaps "
        f"{loss_gap:+.2%} / {flat_gap:+.2%}, target within {LOSS_TOLERANCE:.0%}: "
        f"{verdict(max(abs(loss_gap), abs(flat_gap)) <= LOSS_TOLERANCE)})",
        f"peak mem   ours {ours['peak_memory_mib']:.0f} MiB   padded {base['peak_memory_mib']:.0f} MiB   "
        f"padding-free {flat['peak_memory_mib']:.0f} MiB ({ours['memory_how']}; ours / padding-free "
        + (f"{peak_ratio:.2f}, target <= 1: {verdict(peak_ratio <= 1)})" if peak_ratio else "n/a)"),
    ]
    plan = ours.get("memory_plan") or {}
    if plan.get("plan") and plan.get("measured_peak_bytes"):
        predicted, peak = plan["plan"]["predicted_peak_bytes"], plan["measured_peak_bytes"]
        lines.append(
            f"plan       ours predicted {predicted / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB "
            f"({plan['measured_how']}; measured / predicted {peak / predicted:.2f}); micro-batch "
            f"{plan['plan']['micro_batch_tokens']} tokens, checkpointing "
            f"{'on' if plan['plan']['activation_checkpointing'] else 'off'}")
    if memory:
        lines.append(
            f"peak RSS   LoRA {memory['lora']['peak_rss_mib']:.0f} MiB   QLoRA {memory['qlora']['peak_rss_mib']:.0f} MiB   "
            f"ratio {mem_ratio:.2f} (target <= {MEMORY_TARGET}: {verdict(mem_ratio <= MEMORY_TARGET)})"
        )
    print("\n".join(lines), flush=True)

    date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}"
    )
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"{os.cpu_count()} CPU cores ({cpu_name()}), no GPU"
    if args.json:
        args.json.write_text(json.dumps({
            "date": date, "device": device_name, "precision": precision, "model": model_dir.name, "runs": runs,
            "median": best, "ratio_vs_padded": speedup, "ratio_vs_padding_free": flat_speedup,
            "loss_gap_vs_padded": loss_gap, "loss_gap_vs_padding_free": flat_gap,
            "peak_memory_ratio_vs_padding_free": peak_ratio, "memory_children": memory, "versions": versions,
        }, indent=1))
    if str(args.results) == "-":
        return 0
    record = [
        f"\n## {date} — `bench/train.py{' --quick' if args.quick else ''}`\n",
        f"- machine: {device_name}, {platform.python_version()}; {versions}",
        f"- model: {model_dir.name}, {precision}; {n_train} train / {n_val} val chat records (synthetic, seed 0/1), "
        f"{ours['steps']} optimizer steps, {ours['tokens']} real tokens; hyperparameters "
        f"{json.dumps({k: ours['resolved'][k] for k in ('n_epochs', 'batch_size', 'learning_rate', 'lora_r', 'lora_alpha', 'lora_dropout', 'max_seq_length', 'warmup_ratio')})}",
        f"- padded baseline's padding efficiency (real / padded tokens): {base['padding_efficiency']:.2f}; "
        f"ours and the padding-free baseline pad nothing",
        "- runs (alternating, medians in the table): tokens/s "
        + "; ".join(f"{arm} {[round(r['tokens_per_second']) for r in runs[arm]]}" for arm in ARMS)
        + f"; load average at the end {os.getloadavg()[0]:.1f}",
        "",
        "| | ours | Trainer, padded | Trainer, padding-free | ours / padded | ours / padding-free |",
        "|---|---|---|---|---|---|",
        f"| tokens/s (real tokens) | {ours['tokens_per_second']:.0f} | {base['tokens_per_second']:.0f} | "
        f"{flat['tokens_per_second']:.0f} | {speedup:.2f}x | {flat_speedup:.2f}x |",
        f"| train loop seconds | {ours['train_seconds']:.1f} | {base['train_seconds']:.1f} | "
        f"{flat['train_seconds']:.1f} | | |",
        f"| val loss before → after | {ours['valid_loss_before']:.4f} → {ours['valid_loss_after']:.4f} | "
        f"{base['valid_loss_before']:.4f} → {base['valid_loss_after']:.4f} | "
        f"{flat['valid_loss_before']:.4f} → {flat['valid_loss_after']:.4f} | {loss_gap:+.2%} | {flat_gap:+.2%} |",
        f"| peak memory, MiB ({ours['memory_how']}) | {ours['peak_memory_mib']:.0f} | {base['peak_memory_mib']:.0f} | "
        f"{flat['peak_memory_mib']:.0f} | | " + (f"{peak_ratio:.2f} |" if peak_ratio else "|"),
    ]
    if memory:
        record.append(
            f"| peak RSS, LoRA vs QLoRA ({args.memory_steps} steps, fresh process) | LoRA {memory['lora']['peak_rss_mib']:.0f} MiB | "
            f"QLoRA {memory['qlora']['peak_rss_mib']:.0f} MiB | | {mem_ratio:.2f} | |"
        )
    record += ["", "```", *lines, "```"]
    with args.results.open("a") as fh:
        fh.write("\n".join(record) + "\n")
    print(f"appended to {args.results}")
    return 0


def measured(device: str, run) -> dict:
    """``run()``'s figures plus the peak memory it took (process RSS on a CPU, allocated CUDA memory on a GPU)."""
    import gc

    import torch

    from appliance.training.memory import peak_resident, peak_resident_reset

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        figures = run()
        peak, how = torch.cuda.max_memory_allocated() - before, "CUDA allocated, over the arm"
    else:
        before = peak_resident_reset() or 0
        figures = run()
        peak, how = (peak_resident() or 0) - before, "process peak RSS growth over the arm"
    gc.collect()
    return {**figures, "peak_memory_mib": peak / 2**20, "memory_how": how}


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


def run_ours(model_dir: Path, train_records: list, val_records: list, hp: dict, device: str = "cpu") -> dict:
    from appliance.training import TrainingSpec, train

    spec = TrainingSpec.from_method({"type": "lora", "lora": {"hyperparameters": hp}})
    marks: list[tuple[float, int, int]] = []  # (time, step, trained tokens) at each train event, after its sync

    def on_event(e) -> None:
        if e.type == "train":
            marks.append((time.perf_counter(), e.step, e.trained_tokens))
        print(f"  {e.type} step {e.step}/{e.total_steps} " + (
            f"loss {e.train_loss or e.valid_loss:.4f}" if e.type in ("train", "validation") else (e.message or "")),
            flush=True)

    result = train(spec, model_dir, train_records, val_records, device=device, event_every_steps=WARMUP_STEPS,
                   on_event=on_event)
    m = result.metrics
    steady = None
    if len(marks) >= 2 and marks[0][1] == WARMUP_STEPS:  # from the end of step WARMUP_STEPS to the last event
        steady = (marks[-1][2] - marks[0][2]) / (marks[-1][0] - marks[0][0])
    return {
        "tokens_per_second": m.tokens_per_second, "steady_tokens_per_second": steady,
        "tokens": m.trained_tokens, "steps": m.steps,
        "train_seconds": m.train_seconds, "valid_loss_before": m.valid_loss_before,
        "valid_loss_after": m.valid_loss_after, "resolved": result.hyperparameters.to_dict(),
        "memory_plan": result.details.get("memory"),  # the planner's prediction and the run's measured peak
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
            batch = pack(examples[i : i + 16]).to(next(causal_lm.parameters()).device)
            total += packed_loss_sum(causal_lm, batch).item()
            count += batch.n_targets
    return total / count


def run_baseline(model_dir: Path, train_records: list, val_records: list, hp: dict, device: str = "cpu",
                 flatten: bool = False) -> dict:
    """The stock Trainer + peft: batches padded to their longest example, or (``flatten``) padding-free."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              TrainingArguments)
    from transformers.utils import is_flash_attn_2_available

    SameOrderTrainer = _make_same_order_trainer()

    tokenizer, train_set = tokenised(model_dir, train_records, hp["max_seq_length"])
    _, val_set = tokenised(model_dir, val_records, hp["max_seq_length"])
    torch.manual_seed(hp["seed"])
    bf16 = hp["precision"] == "bf16"
    # Padding-free needs attention that follows the position-id restarts: FlashAttention-2's varlen kernel
    # where installed (a GPU), else SDPA with the block-diagonal mask transformers derives from them.
    attention = "flash_attention_2" if flatten and bf16 and device.startswith("cuda") and \
        is_flash_attn_2_available() else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation=attention, local_files_only=True,
                                                 device_map={"": device})
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
            save_strategy="no", eval_strategy="no", logging_steps=8, report_to=[], use_cpu=device == "cpu",
            bf16=bf16, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        )
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if flatten else \
            DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        clock = _make_step_clock(device)
        trainer = SameOrderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   callbacks=[clock])
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
    steady = None
    if clock.end is not None and clock.start is not None and output.global_step > WARMUP_STEPS:
        # The tokens of the steps after the warm-up: the batches are our recipe's (see SameOrderTrainer).
        per_step = [sum(len(train_set[j]) for j in order[i : i + hp["batch_size"]])
                    for epoch in range(hp["n_epochs"]) for order in [_epoch_order(len(train_set), hp["seed"], epoch)]
                    for i in range(0, len(order), hp["batch_size"])]
        steady = sum(per_step[WARMUP_STEPS:output.global_step]) / (clock.end - clock.start)
    return {
        "tokens_per_second": tokens / seconds, "steady_tokens_per_second": steady,
        "tokens": tokens, "steps": output.global_step,
        "train_seconds": seconds, "valid_loss_before": before,
        "valid_loss_after": eval_loss(model.get_base_model(), val_set, pad_id),
        "padding_efficiency": 1.0 if flatten else sum(len(e) for e in train_set) / padded,
        "attention": attention,
    }


def _make_step_clock(device: str):
    """A ``TrainerCallback`` noting the time at the end of step :data:`WARMUP_STEPS` and of the last step."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        start: float | None = None
        end: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (WARMUP_STEPS, state.max_steps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if state.global_step == WARMUP_STEPS:
                    self.start = time.perf_counter()
                else:
                    self.end = time.perf_counter()

    return StepClock()


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


def run_memory_child(method: str, args: argparse.Namespace, model_dir: Path, n_train: int, resolved: dict) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--memory-child", method, "--model-dir", str(model_dir),
        "--examples", str(n_train), "--batch-size", str(args.batch_size), "--max-seq-length",
        str(args.max_seq_length), "--memory-steps", str(args.memory_steps), "--learning-rate", str(args.learning_rate),
        "--memory-hp", json.dumps(resolved),
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
    if args.memory_child in ("padded", "flattening"):
        started = time.perf_counter()
        hp = {**json.loads(args.memory_hp), "n_epochs": 1}
        figures = run_baseline(args.model_dir, records, instruction_corpus(8, seed=1), hp,
                               flatten=args.memory_child == "flattening")
        status = Path("/proc/self/status").read_text()
        peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        print(json.dumps({"method": args.memory_child, "peak_rss_mib": peak_kib / 1024, "steps": figures["steps"],
                          "tokens_per_second": figures["tokens_per_second"],
                          "seconds": time.perf_counter() - started}))
        return 0
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
