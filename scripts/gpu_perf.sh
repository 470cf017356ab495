#!/usr/bin/env bash
# The device check, part 2: how fast and how much memory? (≈ 5 min on one H100; each step's limit below)
#
#   bash scripts/gpu_perf.sh [--fresh] [--dry-run] [OUT_DIR]     # default ./gpu_perf_out
#
# One JSON line per step (also in OUT_DIR/steps.jsonl; each step's stdout/stderr beside it):
#   env             torch, transformers, the GPU
#   mfu             `nvlm bench train` gpu-1b preset, D and X, bf16 SFT: samples/s, MFU, peak memory, X/D
#   memory_ac_on    peak memory of sharded bf16 steps on long samples (≈ 1.5k-token answers, max_seq_len 4096,
#   memory_ac_off   micro-batch 4) with activation checkpointing on and off, after a warm-up step
#   packed_kernels  forward + backward of 2 packed rows of 8 samples: FlexAttention vs SDPA's dense mask
# Correctness first: scripts/gpu_correctness.sh. CPU-tested: argument parsing and --dry-run only.
set -u
DEFAULT_OUT=gpu_perf_out
source "$(dirname "$0")/gpu_steps.sh"

step env 60 python -c "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, \
'transformers': transformers.__version__, 'gpu': torch.cuda.get_device_name()}))"
step mfu 150 python -m nvlm bench train --device cuda --preset gpu-1b --arch D,X --steps 3 --warmup 1 --threads 8 \
  --json
step prepare 60 python $PY prepare "$OUT/long" --hidden 1024 --layers 8 --samples 32 --answer-words 1500 \
  --max-seq-len 4096 --fresh
step memory_ac_on 60 "${TR[@]}" $PY memory "$OUT/long" --ac --no-compile --steps 2 --warmup 1
step memory_ac_off 60 "${TR[@]}" $PY memory "$OUT/long" --no-ac --no-compile --steps 2 --warmup 1
step packed_kernels 60 python $PY packed-kernels "$OUT/long"
