#!/usr/bin/env bash
# One training stage on several nodes under SLURM: torchrun on every allocated node, all meeting at
# the first node (c10d rendezvous). The arguments are the stage script and its flags:
#
#   sbatch --nodes 4 scripts/slurm.sh train_infill.py --init Llama-2-7b-hf \
#       --data data/code data/code_nl data/nl --out /shared/runs/infill-7b --activation-checkpointing
#
# --out must be on a filesystem every node sees (each rank writes its own checkpoint shards). A
# requeued or resubmitted job resumes from the newest complete checkpoint in --out.
#SBATCH --job-name=codellama
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --requeue
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: sbatch --nodes N scripts/slurm.sh train_X.py [flags]" >&2
    exit 2
fi
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:29500" --rdzv_id "$SLURM_JOB_ID" "$@"
