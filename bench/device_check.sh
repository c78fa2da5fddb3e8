#!/bin/bash
# GPU check on a lent H100/H200 (no internet; packages it lacks travel as wheels in .whl/).
# Trains LoRA (bf16) and QLoRA (NF4) steps and benchmarks serving on a model of SmolLM2-135M's
# shape with random weights (the real GGUF is too big to carry), then runs the GPU serving tests.
# Results go to $OUT (the device tool) or ./device-out.
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
  python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"; } \
  2>&1 | tee "$OUT/environment.txt"
python3 bench/make_random_model.py .gpu/smollm2-config /tmp/smol 2>&1 | tail -1
echo "== training (bench/gpu_check.py)"
timeout 150 python3 bench/gpu_check.py --model-dir /tmp/smol --steps 24 2>"$OUT/gpu_check.err" | tee "$OUT/gpu_check.jsonl"
echo "== training speed: ours vs Trainer padded vs Trainer padding-free (bench/train.py), bf16"
timeout 200 python3 bench/train.py --device cuda --precision bf16 --model-dir /tmp/smol --examples 256 --no-memory \
  --results - --json "$OUT/train_smollm2_shape.json" > "$OUT/train_smollm2_shape.txt" 2>&1; tail -5 "$OUT/train_smollm2_shape.txt"
python3 bench/make_random_model.py .gpu/smollm2-config /tmp/llama1b --like llama-3.2-1b --dtype bf16 --device cuda 2>&1 | tail -1
timeout 300 python3 bench/train.py --device cuda --precision bf16 --model-dir /tmp/llama1b --examples 256 --no-memory \
  --results - --json "$OUT/train_llama1b_shape.json" > "$OUT/train_llama1b_shape.txt" 2>&1; tail -5 "$OUT/train_llama1b_shape.txt"
echo "== serving (bench/serve.py)"
timeout 150 python3 bench/serve.py --device cuda --model-dir /tmp/smol --json "$OUT/serve.json" \
  > "$OUT/serve.txt" 2>&1; tail -25 "$OUT/serve.txt"
echo "== GPU serving tests"
timeout 90 python3 -m pytest --confcutdir=tests/unit/serving -p no:cacheprovider -o addopts= \
  -o "filterwarnings=error::DeprecationWarning:serving.*" tests/unit/serving/test_gpu.py -q 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
