"""Image benchmark: training step time per method, adapter swap latency, RSS over load/unload cycles.

    .venv/bin/python bench/images.py             # default run, about a minute on 2 CPU cores
    .venv/bin/python bench/images.py --quick     # smoke run
    .venv/bin/python bench/images.py --record    # also append the figures to bench/RESULTS.md

On the tiny test pipeline (:func:`appliance.diffusion.build_tiny_sd_pipeline`, 16x16
images), in one process:

1. Training: seconds per optimizer step of ``lora``, ``dreambooth`` and
   ``dreambooth_lora`` (batch 4, rank 4, four 16x16 images; sampling, validation and
   checkpoints excluded: ``train_seconds / steps`` as the trainer reports it).
2. Adapter swap latency in :class:`serving.diffusers_engine.DiffusersEngine`: two LoRAs
   resident, requests alternating between them (one denoising step each); the time the
   engine spends switching the active adapter (``set_adapters``, named mode) or
   swapping weights into its slot (``hotswap`` mode), p50/p95. Load latency
   (validation + ``load_lora_weights`` from bytes) is reported too.
3. Memory: process RSS before and after ``--cycles`` load/unload cycles of a LoRA and
   of a DreamBooth UNet (after warm-up cycles). Target: no growth.

Torch runs with ``--threads`` intra-op threads (default 1: on the tiny model extra
threads only add synchronisation, and the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from appliance.diffusion import ImageTrainingSpec, build_dataset_zip, build_tiny_sd_pipeline, train_images  # noqa: E402
from serving.diffusers_engine import DiffusersEngine, DiffusersEngineConfig  # noqa: E402

METHODS = ("lora", "dreambooth", "dreambooth_lora")
PROMPT = "a photo of sks disc"


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def disc(i: int, size: int = 16) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    r = size * 0.3 + (i % 2)
    cx, cy = size / 2 + (i - 1.5), size / 2 - (i - 1.5) * 0.5
    ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 20, 20))
    return image


def spec(method: str, steps: int, **extra) -> ImageTrainingSpec:
    hp = {"max_train_steps": steps, "train_batch_size": 4, "learning_rate": 1e-3, "checkpoint_every_steps": 0,
          "validation_every_steps": 0, **extra}
    if method != "dreambooth":
        hp["rank"] = 4
    return ImageTrainingSpec.from_method({"type": method, method: {"hyperparameters": hp}})


def bench_training(model_dir: Path, data: bytes, steps: int) -> dict[str, float]:
    train_images(spec("dreambooth_lora", 2), model_dir, data, sample_steps=1)  # warm-up
    out = {}
    for method in METHODS:
        result = train_images(spec(method, steps), model_dir, data, sample_steps=1)
        out[method] = result.metrics.train_seconds / result.metrics.steps
    return out


def bench_swaps(model_dir: Path, loras: list[dict[str, bytes]], requests: int) -> dict[str, dict[str, float]]:
    out = {}
    for mode in ("named", "hotswap"):
        engine = DiffusersEngine.from_pretrained(model_dir, name="tiny", config=DiffusersEngineConfig(lora_mode=mode))
        loads = []
        for i, files in enumerate(loras):
            started = time.perf_counter()
            engine.load_adapter(f"l{i}", files)
            loads.append((time.perf_counter() - started) * 1000)
        for k in range(4):  # warm-up
            engine.generate(PROMPT, model=f"l{k % 2}", num_inference_steps=1, seed=0)
        engine.stats["switch_ms"].clear()
        started = time.perf_counter()
        for k in range(requests):
            engine.generate(PROMPT, model=f"l{k % 2}", num_inference_steps=1, seed=0)
        request_ms = (time.perf_counter() - started) * 1000 / requests
        switches = list(engine.stats["switch_ms"])
        out[mode] = {"switch_p50": pct(switches, 0.5), "switch_p95": pct(switches, 0.95),
                     "load_ms": statistics.median(loads), "request_ms": request_ms, "n": len(switches)}
        engine.close()
    return out


def bench_memory(model_dir: Path, files: dict[str, bytes], cycles: int, warmup: int) -> dict[str, float]:
    engine = DiffusersEngine.from_pretrained(model_dir, name="tiny")
    for k in range(warmup):
        engine.load_adapter("x", files)
        engine.generate(PROMPT, model="x", num_inference_steps=1, seed=0)
        engine.unload_adapter("x")
    gc.collect()
    before = rss_mib()
    samples = []
    for k in range(cycles):
        engine.load_adapter("x", files)
        engine.generate(PROMPT, model="x", num_inference_steps=1, seed=0)
        engine.unload_adapter("x")
        if k % 10 == 9:
            gc.collect()
            samples.append(rss_mib())
    gc.collect()
    after = rss_mib()
    engine.close()
    return {"before": before, "after": after, "growth": after - before, "max": max(samples + [after])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, requests and cycles (smoke run)")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--cycles", type=int, default=None, help="load/unload cycles (default 50; quick 10)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 5 if args.quick else 30
    requests = 10 if args.quick else 60
    cycles = args.cycles or (10 if args.quick else 50)
    warmup = 3 if args.quick else 10

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_sd_pipeline(Path(tmp) / "tiny-sd", seed=0)
        data = build_dataset_zip([disc(i) for i in range(4)], instance_prompt=PROMPT)
        t0 = time.perf_counter()
        training = bench_training(model_dir, data, steps)
        loras = [train_images(spec("dreambooth_lora", 3, seed=s, learning_rate=1e-2), model_dir, data,
                              sample_steps=1).artifacts for s in (0, 1)]
        dreambooth = train_images(spec("dreambooth", 3), model_dir, data, sample_steps=1).artifacts
        swaps = bench_swaps(model_dir, loras, requests)
        memory_lora = bench_memory(model_dir, loras[0], cycles, warmup)
        memory_db = bench_memory(model_dir, dreambooth, cycles, warmup)
        wall = time.perf_counter() - t0

    date = dt.datetime.now(dt.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    machine = (f"{os.cpu_count()} cores, {'CUDA' if torch.cuda.is_available() else 'no GPU'} "
               f"({platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
               f"{args.threads} torch thread(s)), other work running in parallel")
    lines = [
        f"## Images: tiny SD pipeline training, adapter swaps, RSS{' (quick)' if args.quick else ''}",
        "",
        f"Date: {date}. Machine: {machine}. Tiny test pipeline (16x16 images, UNet 0.25 M parameters); "
        f"{steps} steps per method, batch 4, four images; {requests} alternating requests; "
        f"{cycles} load/unload cycles after {warmup} warm-up. Wall time {wall:.0f} s.",
        "",
        "| training | s/step |",
        "|---|---:|",
        *[f"| {m} | {training[m]:.3f} |" for m in METHODS],
        "",
        "| adapter swap (2 LoRAs alternating) | switch p50 ms | switch p95 ms | load ms (median) | request ms |",
        "|---|---:|---:|---:|---:|",
        *[f"| {mode} | {s['switch_p50']:.2f} | {s['switch_p95']:.2f} | {s['load_ms']:.1f} | {s['request_ms']:.1f} |"
          for mode, s in swaps.items()],
        "",
        "| RSS over load/unload cycles | before MiB | after MiB | growth MiB | max MiB |",
        "|---|---:|---:|---:|---:|",
        *[f"| {what} | {m['before']:.1f} | {m['after']:.1f} | {m['growth']:+.1f} | {m['max']:.1f} |"
          for what, m in (("LoRA (named)", memory_lora), ("DreamBooth UNet", memory_db))],
        "",
        "Notes: `named` switches with `set_adapters` between resident adapters; `hotswap` copies the next "
        "adapter's weights into one slot (`load_lora_weights(..., hotswap=True)`), which is what avoids "
        "recompiling a `torch.compile`d UNet on GPU and costs more per switch on a CPU. Target RSS growth: none.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.record:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        with results.open("a") as fh:
            fh.write("\n" + text)
        print(f"appended to {results}")


if __name__ == "__main__":
    main()
