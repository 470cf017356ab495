#!/usr/bin/env bash
# The GPU smoke test in one command (~8 min on one H100/H200): does the scale-out path work on a device?
#
#   bash scripts/gpu_smoke.sh [--fresh] [OUT_DIR]      # default ./gpu_smoke_out; --fresh clears it first
#
# Each step's JSON line and log land under OUT_DIR; a failing step is logged and the next one runs; the summary
# at the end prints every JSON line. Steps (all bf16, FSDP2 through torchrun with one process):
#   1. train:     sharded X-arch run over 30 steps with a background checkpoint every 10; loss must fall
#   2. sigterm:   the same run in a new folder, SIGTERM after ~8 logged steps: it must save and exit 0; then
#                 resumed to the end (check-run: steps 1..30 logged once each, a complete checkpoint)
#   3. memory:    peak reserved/allocated memory with compile on and activation checkpointing on vs off
#                 (AC on must be lower: compile must not switch checkpointing off)
#   4. save:      checkpoint size, synchronous write GB/s, how long an async save blocks training
#   5. syncs:     host-device synchronisations per step found by torch.cuda.set_sync_debug_mode("warn")
#   6. mfu:       `nvlm bench train` gpu-1b preset (D, X, H): samples/s, MFU, peak memory
# Written without a GPU: checked with `bash -n` and the Python parts' CPU test (tests/test_gpu_smoke_cli.py)
# only; it has not run on a device yet.
set -u
FRESH=()
if [ "${1:-}" = "--fresh" ]; then FRESH=(--fresh); shift; fi
OUT=${1:-gpu_smoke_out}
cd "$(dirname "$0")/.."  # OUT is relative to the repository root
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ${#FRESH[@]} -eq 0 ]; then
  echo "error: $OUT is not empty (a rerun would resume finished runs and pass); pass --fresh to clear it" >&2
  exit 2
fi
[ ${#FRESH[@]} -gt 0 ] && rm -rf "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nvlm, installed or not
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=scripts/gpu_smoke.py
TR=(torchrun --standalone --nproc_per_node=1)

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, keep stdout and stderr, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  local rc=$?
  echo "   exit $rc"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

step prepare 120 python $PY prepare "$OUT/smoke" --hidden 1024 --layers 8 --fresh
RUN_CFG="$OUT/smoke/run.json"

# 1. a whole sharded bf16 run, periodic checkpoints written in the background
step train 150 "${TR[@]}" -m nvlm train "$RUN_CFG" --out "$OUT/smoke/train"
step train_check 60 python $PY check-run "$OUT/smoke/train" --steps 30

# 2. SIGTERM mid-run: saves and exits 0; the same command resumes and finishes
echo "== sigterm"
"${TR[@]}" -m nvlm train "$RUN_CFG" --out "$OUT/smoke/sigterm" >"$OUT/sigterm.out" 2>"$OUT/sigterm.err" &
pid=$!
for _ in $(seq 1 120); do  # until 8 steps are logged (at most 2 min)
  n=$(wc -l <"$OUT/smoke/sigterm/metrics.jsonl" 2>/dev/null || echo 0)
  [ "$n" -ge 8 ] && break
  sleep 1
done
t0=$(date +%s.%N)
kill -TERM "$pid"
wait "$pid"
rc=$?
t1=$(date +%s.%N)
# torchrun exits 1 after forwarding SIGTERM even when the worker saved and exited 0: judged by the checkpoint
echo "{\"cmd\": \"sigterm\", \"torchrun_exit\": $rc, \"stop_s\": $(python -c "print(round($t1 - $t0, 2))")}" \
  | tee "$OUT/sigterm.json"
step sigterm_check 60 python $PY check-stop "$OUT/smoke/sigterm" --log "$OUT/sigterm.out"
step resume 150 "${TR[@]}" -m nvlm train "$RUN_CFG" --out "$OUT/smoke/sigterm"
step resume_check 60 python $PY check-run "$OUT/smoke/sigterm" --steps 30

# 3. compile + activation checkpointing: peak memory with AC on vs off
step memory_ac_on 120 "${TR[@]}" $PY memory "$OUT/smoke" --ac --compile --steps 6
step memory_ac_off 120 "${TR[@]}" $PY memory "$OUT/smoke" --no-ac --compile --steps 6

# 4. checkpoint write speed; 5. sync points
step save 120 "${TR[@]}" $PY save-speed "$OUT/smoke"
step syncs 120 "${TR[@]}" $PY sync-points "$OUT/smoke" --steps 3

# 6. MFU of the bench preset
step mfu 200 python -m nvlm bench train --device cuda --preset gpu-1b --arch D,X,H --steps 5 --warmup 2 --json

echo "== summary"
for f in train_check sigterm_check resume_check memory_ac_on memory_ac_off save syncs; do
  echo "$f: $(grep '^{' "$OUT/$f.out" 2>/dev/null | tail -1)"
done
cat "$OUT/sigterm.json"
python - "$OUT/mfu.out" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read())
except (OSError, ValueError) as e:
    sys.exit(f"mfu: no result ({e})")
for arch, a in r["archs"].items():
    mfu = a["mfu"] and f"{100 * a['mfu']:.1f} %"
    print(f"mfu {arch}: {a['samples_per_s']:.2f} samples/s, MFU {mfu}, peak {a['peak_mem_gib']:.1f} GiB")
PY
