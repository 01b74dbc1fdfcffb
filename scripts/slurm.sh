#!/usr/bin/env bash
# One training stage on several nodes under SLURM: torchrun on every allocated node, all meeting at
# the first node (c10d rendezvous). The arguments are the stage script and its flags:
#
#   sbatch --nodes 4 scripts/slurm.sh train_infill.py --init Llama-2-7b-hf \
#       --data data/code data/code_nl data/nl --out /shared/runs/infill-7b \
#       --activation-checkpointing
#
# It asks for whole nodes (--exclusive: every GPU and CPU; --mem=0: all the memory) and starts one
# process per GPU a node has (8, 4, ...), one on a node without GPUs (NPROC_PER_NODE=K sbatch ...
# asks for K); sbatch's own flags change the request (--partition, --time, --gpus-per-node, ...).
# One Slurm task per node: torchrun starts that node's processes. Submitted from any folder: the
# stage script is this repository's (or a file of that name in the submit folder), and the paths in
# its flags are read from the submit folder. --out must be on a filesystem every node sees (each
# rank writes its own checkpoint shards). A requeued job (`scontrol requeue`, a node failure,
# preemption) resumes from the newest complete checkpoint in --out; every attempt appends to the
# same log (slurm-JOBID.out by default), after a line that names it.
#SBATCH --job-name=codellama
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: sbatch --nodes N scripts/slurm.sh train_X.py [flags]" >&2
    exit 2
fi
if [ "${SLURM_NTASKS:-$SLURM_JOB_NUM_NODES}" != "$SLURM_JOB_NUM_NODES" ]; then
    echo "error: scripts/slurm.sh runs one task per node (torchrun starts its processes), not" \
        "$SLURM_NTASKS on $SLURM_JOB_NUM_NODES: drop --ntasks/--ntasks-per-node; NPROC_PER_NODE=K" \
        "sets the processes per node" >&2
    exit 2
fi
# Slurm runs a copy of this file; the job's command line still names the original, as typed
script=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o ' Command=[^ ]*' | cut -d= -f2-)
[[ $script = /* ]] || script=$SLURM_SUBMIT_DIR/$script
repo=$(cd "$(dirname "$script")/.." && pwd)
stage=$1
[ -f "$stage" ] || stage=$repo/$stage
[ -f "$stage" ] || { echo "error: no stage script $1 in $PWD or in $repo" >&2; exit 2; }
shift
# Processes per node: what the user asks, else one per GPU Slurm gave the job on this node, else 1.
# A job step gets the GPUs an exclusive job holds only when it asks for them: srun --gpus-per-node.
gpus=${SLURM_GPUS_ON_NODE:-0}
nproc=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
step_gpus=""
[ "$gpus" = 0 ] || step_gpus=--gpus-per-node=$gpus
# The batch script runs on the allocation's first node: the rendezvous is here, on a free port.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
echo "slurm.sh: job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) at $(date -Is):" \
    "$SLURM_JOB_NUM_NODES node(s) x $nproc process(es), rendezvous $SLURMD_NODENAME:$port"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 $step_gpus \
    torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$nproc" --rdzv_backend c10d \
    --rdzv_endpoint "$SLURMD_NODENAME:$port" --rdzv_id "$SLURM_JOB_ID" "$stage" "$@"
