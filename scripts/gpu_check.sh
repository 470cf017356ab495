#!/usr/bin/env bash
# The training-speed figures on a GPU in one go, so a GPU's minutes are not spent typing.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default ./gpu_check_out; ~8 min on one H100/H200
#
# What it writes (each step's JSON and log under OUT_DIR; a step that fails is logged and the next runs):
#   1. nvlm bench train, gpu-1b preset, bf16, D/X/H, SFT: samples/s, MFU against the device's bf16 peak,
#      CUDA peak memory per arch, X/D and H/D (goals: D MFU >= 40 %, X/D >= 1.9, H/D >= 1.6);
#   2. the same in the pretrain stage (LLM frozen);
#   3. the packing tests (packed loss under flex_attention = unpacked; these build on the CPU: a GPU test of
#      flash_attention_2 over packed rows does not exist yet);
#   4. the dry-run memory plan against a measured peak (scripts/plan_vs_measured.py).
# `nvlm bench … --vs hf` runs the CPU preset only so far; its GPU comparison is not part of this script.
# Not run on a GPU yet.
set -u
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, keep stdout and stderr, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  echo "   exit $? ($(wc -c <"$OUT/$name.out") bytes of output)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
  >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step train_sft 200 python -m nvlm bench train --device cuda --preset gpu-1b --arch D,X,H --steps 5 --warmup 2 --json
step train_pretrain 150 python -m nvlm bench train --device cuda --preset gpu-1b --arch D,X,H --stage pretrain \
  --steps 3 --warmup 1 --json
step varlen_tests 120 python -m pytest tests/test_packing_default.py -q -x
step plan_vs_measured 120 python scripts/plan_vs_measured.py

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("train_sft", "train_pretrain"):
    try:
        r = json.loads((out / f"{name}.out").read_text())
    except (OSError, ValueError) as e:
        print(f"{name}: no result ({e})")
        continue
    for arch, a in r["archs"].items():
        mfu = a["mfu"] and f"{100 * a['mfu']:.1f} %"
        print(f"{name} {arch}: {a['samples_per_s']:.2f} samples/s, MFU {mfu}, peak {a['peak_mem_gib']:.1f} GiB")
    for k, v in r["ratios"].items():
        print(f"{name} {k}: {v['measured']:.2f} (FLOP-predicted {v['flops_predicted']:.2f}, paper {v['paper']})")
PY
