#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU,
# all meeting at the first node of the allocation. Submit from the checkout's root folder:
#   sbatch launch/slurm.sh configs/gpt2_xl.json
#   sbatch --nodes 4 --gres gpu:8 launch/slurm.sh configs/gpt2_xl.json --max_steps 2000
# Settings, all optional, from the environment (sbatch passes it on):
#   GPUS_PER_NODE  processes per node; default: the GPUs SLURM gave the node, else those nvidia-smi lists.
#                  A node with no GPU runs 1 process on its CPU (DDP over gloo, `--use_cpu true` added).
#   MAIN_PORT      the head node's port for the processes to meet at; default 29500.
#   ACCELERATE     the accelerate command; default .venv/bin/accelerate (what `make install` makes), else
#                  `accelerate` from PATH.
# output_dir must be on a file system every node sees: rank 0 writes the tokenizer and model there.
#SBATCH --job-name=tsg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/slurm.sh CONFIG [--key value ...]}
shift
# The node this batch script runs on stands for every node of the allocation (they are alike).
GPUS=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi --list-gpus 2>/dev/null || true) | grep -c '^GPU' || true)}
CPU_ARGS=()
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$GPUS
  if (( GPUS_PER_NODE == 0 )); then
    GPUS_PER_NODE=1
  fi
fi
if (( GPUS == 0 )); then
  CPU_ARGS=(--use_cpu true)
fi
MAIN_PORT=${MAIN_PORT:-29500}
if [[ -z "${ACCELERATE:-}" ]]; then
  ACCELERATE=accelerate
  if [[ -x .venv/bin/accelerate ]]; then
    ACCELERATE=.venv/bin/accelerate
  fi
fi
# sed, not head: head exits after one line and scontrol could die of SIGPIPE, failing the pipeline.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export HEAD_NODE GPUS_PER_NODE MAIN_PORT ACCELERATE
# srun starts this once per node; SLURM_NODEID is the node's rank. The run's arguments travel as
# arguments, not in a string, so that values with spaces survive.
srun bash -c '$ACCELERATE launch \
  --config_file launch/multi_node.yaml \
  --num_machines "$SLURM_NNODES" \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$HEAD_NODE" \
  --main_process_port "$MAIN_PORT" \
  tsg/train.py "$@"' bash "$CONFIG" "$@" "${CPU_ARGS[@]}"
