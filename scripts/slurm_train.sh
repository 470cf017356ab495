#!/usr/bin/env bash
# Multi-node NVLM training on Slurm: one torchrun per node, each starting one process per GPU.
#
#   sbatch --nodes=16 --gpus-per-node=8 --cpus-per-task=64 scripts/slurm_train.sh d-72b-sft runs/d72b-sft \
#       model.llm=/w/Qwen2-72B-Instruct
#
# Arguments: RECIPE (a name or a YAML/JSON config), OUT (a run folder on a file system all nodes share: the
# checkpoints are written there by every process), then key=value overrides. Re-submitting with the same OUT
# resumes from the last complete checkpoint, on the same or another number of nodes. Plan the layout first:
# `nvlm train RECIPE --dry-run --world-size $((NODES * 8))` prints memory, step time, MFU and a recommendation.
#
# CPUs: the one task per node is torchrun, which starts a process per GPU; all of them (and their data threads)
# run inside that task's CPU allocation. Without --cpus-per-task a task gets 1 CPU, and since Slurm 22.05 srun
# no longer inherits sbatch's --cpus-per-task (SRUN_CPUS_PER_TASK carries it over), so all workers would land on
# one core. Set it here (64 below; override on the sbatch line to the node's cores) and pass it on to srun.
#
# Before the time limit Slurm sends SIGTERM (--signal below: 15 min ahead) to the job step, i.e. torchrun;
# torchrun passes it to every process, which finishes its step, saves a checkpoint and exits 0. torchrun kills processes that have not exited after TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# seconds (30 by default: too short for a 72B save), set below.
#SBATCH --job-name=nvlm
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --signal=TERM@900
set -euo pipefail
RECIPE=${1:?usage: slurm_train.sh RECIPE OUT [key=value ...]}
OUT=${2:?usage: slurm_train.sh RECIPE OUT [key=value ...]}
shift 2
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=${SLURM_GPUS_ON_NODE:-8}
CPUS=${SLURM_CPUS_PER_TASK:-64}
export SRUN_CPUS_PER_TASK=$CPUS  # Slurm >= 22.05: srun reads this, not sbatch's --cpus-per-task
# torch's CPU threads per process: the task's CPUs shared among the node's processes (data threads come on top)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS / GPUS > 1 ? CPUS / GPUS : 1))}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# packed rows and tile counts change the shapes every step: growable segments keep reserved memory near allocated
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# --kill-on-bad-exit: one node's torchrun failing ends the others, instead of them waiting out the timeout
srun --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \
    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS" --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:29500" \
    -m nvlm train "$RECIPE" --out "$OUT" "$@"
