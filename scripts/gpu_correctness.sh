#!/usr/bin/env bash
# The device check, part 1: does the GPU path work? (≈ 4 min on one H100; each step's limit below)
#
#   bash scripts/gpu_correctness.sh [--fresh] [--dry-run] [OUT_DIR]     # default ./gpu_correctness_out
#
# One JSON line per step (also in OUT_DIR/steps.jsonl; each step's stdout/stderr beside it):
#   env            torch, transformers, the GPU
#   gpu_tests      tests/test_gpu.py -m gpu: CUDA generate fp32/bf16, 1-process bf16 training, FSDP2 = plain,
#                  async-DCP stop/resume, x-attn SDPA without the math kernel, packed rows under FlexAttention
#   train          a sharded (torchrun, FSDP2) bf16 NVLM-X run of 20 steps, background checkpoint at 10
#   sigterm        the same in a new folder, SIGTERM after 6 logged steps: judged by the checkpoint it saved
#                  (torchrun itself exits 1 after forwarding the signal), then resumed to the end and checked
#   syncs          host-device synchronisations per step (torch.cuda.set_sync_debug_mode)
#   seeded_sampling  model.chat(do_sample=True, seed=0) on CUDA twice: the same text
# The performance figures: scripts/gpu_perf.sh. CPU-tested: argument parsing and --dry-run only.
set -u
DEFAULT_OUT=gpu_correctness_out
source "$(dirname "$0")/gpu_steps.sh"
RUN=(-m nvlm train "$OUT/smoke/run.json" train.max_steps=20 train.save_every=10)

step env 60 python -c "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, \
'transformers': transformers.__version__, 'gpu': torch.cuda.get_device_name()}))"
step gpu_tests 150 python -m pytest tests/test_gpu.py -m gpu -q -x -p no:cacheprovider
step prepare 60 python $PY prepare "$OUT/smoke" --hidden 512 --layers 4 --samples 48 --fresh
step train 90 "${TR[@]}" "${RUN[@]}" --out "$OUT/smoke/train"
step train_check 30 python $PY check-run "$OUT/smoke/train" --steps 20

if [ $DRY -eq 1 ]; then
  echo '{"step": "sigterm", "limit_s": 90, "cmd": ["torchrun", "...", "SIGTERM after 6 logged steps"]}'
else  # SIGTERM mid-run: torchrun forwards it; the worker saves and exits 0
  t0=$SECONDS
  "${TR[@]}" "${RUN[@]}" --out "$OUT/smoke/sigterm" >"$OUT/sigterm.out" 2>"$OUT/sigterm.err" &
  pid=$!
  for _ in $(seq 1 90); do
    n=$(wc -l <"$OUT/smoke/sigterm/metrics.jsonl" 2>/dev/null || echo 0)
    [ "$n" -ge 6 ] && break
    sleep 1
  done
  kill -TERM "$pid"
  wait "$pid"
  echo "{\"step\": \"sigterm\", \"torchrun_exit\": $?, \"s\": $((SECONDS - t0))}" | tee -a "$OUT/steps.jsonl"
fi
step sigterm_check 30 python $PY check-stop "$OUT/smoke/sigterm" --log "$OUT/sigterm.out"
step resume 90 "${TR[@]}" "${RUN[@]}" --out "$OUT/smoke/sigterm"
step resume_check 30 python $PY check-run "$OUT/smoke/sigterm" --steps 20
step syncs 60 "${TR[@]}" $PY sync-points "$OUT/smoke" --steps 3
step seeded_sampling 60 python $PY seeded-sampling "$OUT/smoke"
