"""GPU smoke check of the training recipes: a few minutes on a lent H100/H200, offline.

    python bench/gpu_check.py                      # CUDA: LoRA (bf16) and QLoRA on the demo model
    python bench/gpu_check.py --device cpu --quick # the same, small, on CPU (to test the script)

Prints one JSON line per check (``environment``, ``import``, ``lora``,
``qlora``) with ``ok``, tokens/s, peak GPU memory and validation loss before
and after, and exits non-zero when a package is missing (exit 2) or a check
fails (exit 1). Each training check passes when it completes, its losses are
finite and validation loss falls. Runs well under three minutes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REQUIRED = {
    "torch": "torch",
    "transformers": "transformers>=5",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes>=0.50",
    "safetensors": "safetensors",
    "gguf": "gguf",
    "accelerate": "accelerate",
    "appliance": "the appliance itself (pip install -e .)",
}


def emit(check: str, ok: bool, **fields) -> None:
    print(json.dumps({"check": check, "ok": ok, **fields}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="a few tiny steps (for CPU)")
    parser.add_argument("--model-dir", type=Path, help="an imported model (default: import the demo GGUF)")
    parser.add_argument("--steps", type=int, help="optimizer steps per check (default 24, quick 3)")
    args = parser.parse_args()

    missing = []
    versions = {}
    for module, requirement in REQUIRED.items():
        try:
            versions[module] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:  # an ImportError, or a broken native library
            missing.append(f"{requirement} ({type(exc).__name__}: {exc})")
    if missing:
        emit("environment", False, missing=missing, hint="install the missing packages; no internet is needed "
             "for anything else")
        return 2

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        emit("environment", False, error=f"--device {args.device} but torch {torch.__version__} sees no CUDA device "
             f"(torch.version.cuda={torch.version.cuda}); is this the CPU build of torch?")
        return 1
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else "cpu"
    emit("environment", True, device=args.device, device_name=device_name, versions=versions,
         bf16=bool(cuda and torch.cuda.is_bf16_supported()))

    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(scratch) / "smollm2-135m"
            started = time.perf_counter()
            try:
                from appliance.modelstore import demo_gguf_path, import_model

                info = import_model(demo_gguf_path(), model_dir, "smollm2-135m")
            except Exception as exc:
                emit("import", False, error=f"{type(exc).__name__}: {exc}")
                return 2 if "not installed" in str(exc) else 1
            emit("import", True, seconds=round(time.perf_counter() - started, 1), parameters=info.parameter_count,
                 content_hash=info.content_hash)

        steps = args.steps or (3 if args.quick else 24)
        batch_size = 2 if args.quick else 8
        for method, extra in (("lora", {"precision": "bf16" if cuda else "fp32"}), ("qlora", {})):
            failed |= not run_check(method, extra, model_dir, args.device, steps, batch_size, args.quick)
    return 1 if failed else 0


def run_check(method: str, extra: dict, model_dir: Path, device: str, steps: int, batch_size: int, quick: bool) -> bool:
    import torch

    from appliance.training import TrainingSpec, train
    from bench.synthetic import instruction_corpus

    hp = {"n_epochs": 1, "batch_size": batch_size, "learning_rate": 1e-3, "max_seq_length": 128 if quick else 512,
          "warmup_ratio": 0.0, "checkpoint_every_steps": 0, "seed": 0, **extra}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        spec = TrainingSpec.from_method({"type": method, method: {"hyperparameters": hp}})
        result = train(spec, model_dir, instruction_corpus(steps * batch_size, seed=0),
                       instruction_corpus(4 if quick else 32, seed=1), device=device)
    except Exception as exc:
        emit(method, False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:])
        return False
    m = result.metrics
    losses = (m.valid_loss_before, m.valid_loss_after, m.train_loss)
    finite = all(x is not None and math.isfinite(x) for x in losses)
    ok = result.status == "succeeded" and finite and m.valid_loss_after < m.valid_loss_before
    emit(
        method, ok,
        device=device, steps=m.steps, tokens=m.trained_tokens,
        tokens_per_second=round(m.tokens_per_second, 1),
        peak_gpu_memory_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        valid_loss_before=m.valid_loss_before, valid_loss_after=m.valid_loss_after, train_loss=m.train_loss,
        seconds=round(time.perf_counter() - started, 1), details=result.details,
        adapter_bytes=sum(len(v) for v in (result.adapter or {}).values()),
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
