"""GPU check for the image side, to run on a CUDA host (not run yet: no GPU run was possible from this branch).

    python3 bench/images_gpu.py

On the tiny test pipeline: each method trains 6 steps under fp16 (GradScaler) and
bf16 mixed precision with Min-SNR and prior preservation, then resumes from the
step-4 checkpoint (prints the largest weight difference: CUDA kernels need not be
bit-exact); the engine serves a LoRA and a DreamBooth model in float16; hotswap
mode runs with a ``torch.compile``d UNet (dynamo counters show whether a swap
recompiled). Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load  # noqa: E402

from appliance.diffusion import ImageTrainingSpec, build_dataset_zip, build_tiny_sd_pipeline, train_images  # noqa: E402
from bench.images import PROMPT, disc  # noqa: E402
from serving.diffusers_engine import DiffusersEngine, DiffusersEngineConfig  # noqa: E402


def spec(method: str, **hp) -> ImageTrainingSpec:
    base = {"max_train_steps": 6, "train_batch_size": 2, "learning_rate": 1e-3, "checkpoint_every_steps": 2,
            "validation_every_steps": 0, **hp}
    return ImageTrainingSpec.from_method({"type": method, method: {"hyperparameters": base}})


def tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    return {f"{n}:{k}": v for n, b in files.items() if n.endswith(".safetensors") for k, v in load(b).items()}


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for GPU hosts (bench/images.py is the CPU benchmark)")
    print("device", torch.cuda.get_device_name(0))
    model_dir = build_tiny_sd_pipeline(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    data = build_dataset_zip([disc(i) for i in range(4)], instance_prompt=PROMPT)
    results, artifacts = {}, {}
    for method in ("dreambooth_lora", "dreambooth"):
        for precision in ("fp16", "bf16"):
            hp = {"mixed_precision": precision, "snr_gamma": 5.0, "class_prompt": "a disc", "num_class_images": 2}
            if method == "dreambooth_lora":
                hp["rank"] = 4
            try:
                checkpoints: dict[int, bytes] = {}
                started = time.time()
                full = train_images(spec(method, **hp), model_dir, data, device="cuda", sample_steps=4,
                                    on_checkpoint=checkpoints.__setitem__)
                resumed = train_images(spec(method, **hp), model_dir, data, device="cuda", sample_steps=4,
                                       resume_from=checkpoints[4])
                a, b = tensors(full.artifacts), tensors(resumed.artifacts)
                results[f"{method}/{precision}"] = {
                    "seconds": round(time.time() - started, 1),
                    "s_per_step": full.metrics.train_seconds / full.metrics.steps,
                    "train_loss": full.metrics.train_loss,
                    "finite": all(bool(torch.isfinite(t).all()) for t in a.values()),
                    "resume_max_abs_diff": max((a[k].float() - b[k].float()).abs().max().item() for k in a),
                }
                artifacts[f"{method}/{precision}"] = full.artifacts
            except Exception as exc:  # a check to read: report and go on
                traceback.print_exc()
                results[f"{method}/{precision}"] = repr(exc)[:300]
    print(json.dumps(results, indent=1))

    try:
        with DiffusersEngine.from_pretrained(model_dir, name="tiny") as engine:
            engine.load_adapter("lora", artifacts["dreambooth_lora/fp16"])
            engine.load_adapter("db", artifacts["dreambooth/fp16"])
            out = {m: engine.generate(PROMPT, model=m, seed=1, num_inference_steps=5, n=2) for m in ("tiny", "lora", "db")}
            again = engine.generate(PROMPT, model="tiny", seed=1, num_inference_steps=5, n=2)
            print("serving", engine.device, engine.dtype, {m: len(v) for m, v in out.items()}, "base stable:",
                  again == out["tiny"])
    except Exception:
        traceback.print_exc()

    try:
        import torch._dynamo as dynamo

        config = DiffusersEngineConfig(lora_mode="hotswap", max_lora_rank=8)
        with DiffusersEngine.from_pretrained(model_dir, name="tiny", config=config) as engine:
            engine.load_adapter("a", artifacts["dreambooth_lora/fp16"])
            engine.load_adapter("b", artifacts["dreambooth_lora/bf16"])
            engine.generate(PROMPT, model="a", seed=0, num_inference_steps=1)  # fills the slot before compiling
            engine.pipe.unet = torch.compile(engine.pipe.unet)
            started = time.time()
            engine.generate(PROMPT, model="a", seed=0, num_inference_steps=2)
            print("compile + first request s", round(time.time() - started, 1))
            dynamo.utils.counters.clear()
            times = []
            for k in range(10):
                started = time.time()
                engine.generate(PROMPT, model="ab"[k % 2], seed=0, num_inference_steps=2)
                torch.cuda.synchronize()
                times.append(round(time.time() - started, 3))
            print("hotswap requests s", times, "dynamo counters since compile:", dict(dynamo.utils.counters["stats"]))
            print("switch ms", [round(x, 1) for x in list(engine.stats["switch_ms"])[-10:]])
    except Exception:
        traceback.print_exc()


if __name__ == "__main__":
    main()
