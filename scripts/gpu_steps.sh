# Shared by scripts/gpu_correctness.sh and scripts/gpu_perf.sh (sourced, not run): options, the output folder and
# `step`, which runs one command with a time limit and prints one JSON line for it.
#
#   [--fresh] [--dry-run] [OUT_DIR]   --fresh clears a used OUT_DIR (else refused: a rerun would resume finished
#                                     runs and pass); --dry-run prints each step's JSON line with its command only
FRESH=0
DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --fresh) FRESH=1 ;;
    --dry-run) DRY=1 ;;
    -*) echo "error: unknown option $1 (use --fresh, --dry-run)" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
OUT=${1:-$DEFAULT_OUT}
cd "$(dirname "$0")/.."  # OUT is relative to the repository root
if [ $DRY -eq 0 ]; then
  if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ $FRESH -eq 0 ]; then
    echo "error: $OUT is not empty (a rerun would resume finished runs and pass); pass --fresh to clear it" >&2
    exit 2
  fi
  [ $FRESH -eq 1 ] && rm -rf "$OUT"
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's nvlm, installed or not
# packed rows and tile counts change shapes every step: growable segments keep reserved memory near allocated
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=scripts/gpu_smoke.py
TR=(torchrun --standalone --nproc_per_node=1)

json_line() {  # json_line FILE: the file's JSON as one line (whole file, else its last line that parses), or null
  python - "$1" <<'PYEOF'
import json, sys
try:
    text = open(sys.argv[1]).read()
except OSError:
    print("null"); sys.exit()
for chunk in [text] + text.splitlines()[::-1]:
    try:
        print(json.dumps(json.loads(chunk))); sys.exit()
    except ValueError:
        pass
tail = [line for line in text.splitlines() if line.strip()][-1:]
print(json.dumps(tail[0] if tail else None))
PYEOF
}

step() {  # step NAME LIMIT_S COMMAND...: one JSON line {"step", "rc", "s", "result"}; never stops the script
  local name=$1 limit=$2
  shift 2
  if [ $DRY -eq 1 ]; then
    python -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "limit_s": int(sys.argv[2]), "cmd": sys.argv[3:]}))' \
      "$name" "$limit" "$@"
    return 0
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"s\": $((SECONDS - t0)), \"result\": $(json_line "$OUT/$name.out")}" \
    | tee -a "$OUT/steps.jsonl"
  return $rc
}
