#!/usr/bin/env bash
# Multi-node NVLM training on Slurm: one torchrun per node, each starting one process per GPU.
#
#   sbatch --nodes=16 --gpus-per-node=8 scripts/slurm_train.sh d-72b-sft runs/d72b-sft model.llm=/w/Qwen2-72B-Instruct
#
# Arguments: RECIPE (a name or a YAML/JSON config), OUT (a run folder on a file system all nodes share: the
# checkpoints are written there by every process), then key=value overrides. Re-submitting with the same OUT
# resumes from the last complete checkpoint, on the same or another number of nodes.
#
# Before the time limit Slurm sends SIGTERM (--signal above: 15 min ahead); torchrun passes it to every
# process, which finishes its step, saves a checkpoint and exits 0. torchrun kills processes that have not
# exited after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default: too short for a 72B save), set below.
#SBATCH --job-name=nvlm
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@900
set -euo pipefail
RECIPE=${1:?usage: slurm_train.sh RECIPE OUT [key=value ...]}
OUT=${2:?usage: slurm_train.sh RECIPE OUT [key=value ...]}
shift 2
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=${SLURM_GPUS_ON_NODE:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS" --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:29500" \
    -m nvlm train "$RECIPE" --out "$OUT" "$@"
