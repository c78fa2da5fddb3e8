#!/bin/bash
# GPU check on a lent H100/H200 (no internet; packages it lacks travel as wheels in .whl/, carried
# with .gpu/smollm2-config: SmolLM2-135M's config.json and tokenizer files, from `import_model` of the demo GGUF).
# In order of what matters most, each step bounded so the whole fits one 10-minute call:
#   1. the GPU tests: packed attention's kernel against the per-example path; the embedded engine;
#   2. bench/train.py's three arms (ours, Trainer padded, Trainer padding-free) in bf16 on a randomly
#      initialised Llama-3.2-1B shape and on SmolLM2-135M's shape, with our plan's predicted vs measured peak;
#   3. bench/gpu_check.py: LoRA and QLoRA (NF4) steps.
# Results go to $OUT (the device tool) or ./device-out.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"; } \
  2>&1 | tee "$OUT/environment.txt"
echo "== GPU tests"
timeout 100 python3 -m pytest -p no:cacheprovider -o addopts= --confcutdir=tests/unit/training -q -rs \
  tests/unit/training/test_packing.py -k "gpu or flex" 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"
timeout 60 python3 -m pytest --confcutdir=tests/unit/serving -p no:cacheprovider -o addopts= \
  -o "filterwarnings=error::DeprecationWarning:serving.*" tests/unit/serving/test_gpu.py -q 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.txt"
python3 bench/make_random_model.py .gpu/smollm2-config /tmp/llama1b --like llama-3.2-1b --dtype bf16 --device cuda 2>&1 | tail -1
echo "== training speed: ours vs Trainer padded vs Trainer padding-free (bench/train.py), bf16, Llama-3.2-1B shape"
timeout 220 python3 bench/train.py --device cuda --precision bf16 --model-dir /tmp/llama1b --examples 768 --no-memory \
  --results - --json "$OUT/train_llama1b_shape.json" > "$OUT/train_llama1b_shape.txt" 2>&1; tail -6 "$OUT/train_llama1b_shape.txt"
python3 bench/make_random_model.py .gpu/smollm2-config /tmp/smol 2>&1 | tail -1
echo "== the same, SmolLM2-135M shape"
timeout 100 python3 bench/train.py --device cuda --precision bf16 --model-dir /tmp/smol --examples 256 --no-memory \
  --results - --json "$OUT/train_smollm2_shape.json" > "$OUT/train_smollm2_shape.txt" 2>&1; tail -6 "$OUT/train_smollm2_shape.txt"
echo "== LoRA and QLoRA steps (bench/gpu_check.py)"
timeout 80 python3 bench/gpu_check.py --model-dir /tmp/smol --steps 24 2>"$OUT/gpu_check.err" | tee "$OUT/gpu_check.jsonl"
