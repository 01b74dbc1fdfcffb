#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (munge, slurmctld and slurmd, as Debian's slurm-wlm
# packages them), with its configuration, state and logs in one folder: to try scripts/slurm.sh
# and `dedup.py --slurm-partition` as a user would, and for tests/test_slurm.py. As root (slurmd
# starts each job as its user); `apt-get install slurmctld slurmd slurm-client munge` first
# (scripts/setup.sh --dev does, as root).
#
#   bash scripts/slurm_cluster.sh start /tmp/slurm      # prints: export SLURM_CONF=...
#   export SLURM_CONF=/tmp/slurm/slurm.conf
#   sbatch --nodes 1 scripts/slurm.sh train_code.py ...; squeue; scontrol requeue JOB
#   bash scripts/slurm_cluster.sh stop /tmp/slurm
#
# `start DIR GPUS` gives the node GPUS GPUs in Slurm's books (a count only, no devices: the jobs
# still run on the CPU), to see what a job is given on a GPU node. The one partition is `debug`.
# The daemons' ports are free ones picked at start, so it runs beside any other Slurm.
set -euo pipefail
usage="usage: bash scripts/slurm_cluster.sh start DIR [GPUS] | stop DIR"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
cmd=$1 dir=$2 gpus=${3:-0}

if [ "$cmd" = stop ]; then
    # its jobs first (a job outlives slurmd): cancelled, until none runs (their steps kill what is
    # left); then the daemons, by the pid files it gave them
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF=$dir/slurm.conf
        squeue -h -o %A | sort -u | xargs -r scancel
        for _ in $(seq 100); do [ -z "$(squeue -h -t PD,CF,R -o %A)" ] && break; sleep 0.2; done
    fi
    pids=$(cat "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid" 2>/dev/null || true)
    for pid in $pids; do kill "$pid" 2>/dev/null || true; done
    for pid in $pids; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    exit 0
fi
[ "$cmd" = start ] || { echo "$usage" >&2; exit 2; }
for exe in munged slurmctld slurmd sbatch; do
    command -v "$exe" >/dev/null || { echo "error: $exe is missing: apt-get install slurmctld" \
        "slurmd slurm-client munge" >&2; exit 1; }
done
if [ "$(id -u)" != 0 ]; then
    echo "error: slurmd starts jobs as their user: run this as root" >&2
    exit 1
fi
mkdir -p "$dir/ctld" "$dir/spool"
dir=$(cd "$dir" && pwd)
chmod 755 "$dir"  # munged: a socket folder others may enter but not write

# munge: authenticates every message between the commands and the daemons, with a key of our own
if [ ! -f "$dir/munge.key" ]; then
    head -c 1024 /dev/urandom > "$dir/munge.key"
    chmod 400 "$dir/munge.key"
fi
munged --socket="$dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"

port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
# The node: its real CPUs and memory (slurmd -C), called localhost so that its name resolves
node=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]*/NodeName=localhost NodeAddr=127.0.0.1/')
rm -f "$dir/gres.conf"
if [ "$gpus" != 0 ]; then  # Slurm counts GPUs by their device files: empty files stand in
    for i in $(seq 0 $((gpus - 1))); do touch "$dir/gpu$i"; done
    node="$node Gres=gpu:$gpus"
    echo "Name=gpu File=$dir/gpu[0-$((gpus - 1))]" > "$dir/gres.conf"
fi
cat > "$dir/slurm.conf" <<EOF
ClusterName=codellama
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(port)
SlurmdPort=$(port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# no cgroups in a container: processes are tracked by their parents, tasks are not confined
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/builtin
# start a job as soon as it can run (the default waits up to 3 s to gather submissions)
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=600
KillWait=5
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf
slurmctld -i
slurmd -N localhost
for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "error: the Slurm node did not come up in 20 s; logs in $dir" >&2
tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
