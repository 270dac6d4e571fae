#!/bin/bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU,
# all meeting at the first node of the allocation.
#   sbatch launch/slurm.sh configs/gpt2_xl.json
#   sbatch --nodes 4 --gres gpu:8 launch/slurm.sh configs/gpt2_xl.json --max_steps 2000
#SBATCH --job-name=tsg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch launch/slurm.sh CONFIG [--key value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export HEAD_NODE GPUS_PER_NODE CONFIG
export TSG_ARGS="$*"
# srun starts this once per node; SLURM_NODEID is the node's rank.
srun bash -c '.venv/bin/accelerate launch \
  --config_file launch/multi_node.yaml \
  --num_machines "$SLURM_NNODES" \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$HEAD_NODE" \
  --main_process_port 29500 \
  tsg/train.py "$CONFIG" $TSG_ARGS'
