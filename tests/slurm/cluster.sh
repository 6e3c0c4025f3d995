#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the test suite (no mocks).
#
#   tests/slurm/cluster.sh install     # Debian packages: slurmctld, slurmd, slurm-client, munge
#   tests/slurm/cluster.sh start DIR   # write slurm.conf/gres.conf under DIR, start munged+daemons
#   tests/slurm/cluster.sh stop DIR
#
# SLURM_TEST_PORT (default 16817) is slurmctld's port, slurmd gets the next one: give a free pair
# when another test cluster may be running on this machine.
#
# The node advertises two fake GPUs (GRES backed by /dev/null and /dev/zero, see REFERENCE.md 4)
# so rules that request `gpu: 1` are scheduled with CUDA_VISIBLE_DEVICES set. No accounting
# daemon: the Snakemake profile for tests uses `slurm-status-command: squeue` (sacct would fail).
set -euo pipefail
# Debian installs the daemons (munged, slurmctld, slurmd) in /usr/sbin, which a non-login or
# minimal PATH (CI's /usr/local/bin:/usr/bin:/bin) leaves out.
export PATH="$PATH:/usr/sbin:/sbin"

cmd=${1:?usage: cluster.sh install|start DIR|stop DIR}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start() {
    local dir=${1:?state folder}
    mkdir -p "$dir"/{spool/ctld,spool/d,log,run}
    dir=$(cd "$dir" && pwd)
    local node cpus mem port
    port=${SLURM_TEST_PORT:-16817}
    node=$(hostname -s)
    # the CPUs this machine lets us use; GNU nproc would report OMP_NUM_THREADS instead when set
    # (OMP_NUM_THREADS=1 gave a 1-CPU node, on which 2-CPU jobs pend forever: PartitionConfig)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    # Leave headroom: slurmd refuses a node whose configured memory exceeds what it sees.
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
    cat > "$dir/slurm.conf" <<CONF
ClusterName=cxrssl-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
TaskProlog=$dir/task_prolog.sh
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:fake:2 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
    # Runs before each task (the batch script included); a `print` line goes to the job's stdout,
    # so the sbatch log shows which GPUs SLURM handed the job (tests check CUDA_VISIBLE_DEVICES).
    cat > "$dir/task_prolog.sh" <<'SH'
#!/bin/sh
echo "print cxrssl-test-node: SLURM_JOB_ID=${SLURM_JOB_ID} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset} SLURM_JOB_GPUS=${SLURM_JOB_GPUS:-unset}"
SH
    chmod 755 "$dir/task_prolog.sh"
    cat > "$dir/gres.conf" <<CONF
AutoDetect=off
NodeName=$node Name=gpu Type=fake File=/dev/null
NodeName=$node Name=gpu Type=fake File=/dev/zero
CONF
    export SLURM_CONF="$dir/slurm.conf"
    # Job steps must find the config without SLURM_CONF: snakemake-executor-plugin-slurm-jobstep
    # (0.6.1) drops every SLURM_* variable before its inner `srun`, which then reads only the
    # default path. Link ours there unless a real (non-link) config already sits there.
    mkdir -p /etc/slurm
    if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
        ln -sfn "$dir/slurm.conf" /etc/slurm/slurm.conf
    else
        echo "warning: /etc/slurm/slurm.conf is not ours; job steps will read it" >&2
    fi
    # munge: a key of our own, daemon in the foreground-less default mode
    mkdir -p /etc/munge /var/run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chmod 400 /etc/munge/munge.key
    if ! pgrep -x munged >/dev/null; then
        munged --force
    fi
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 1 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "slurm up: $(sinfo -h -o '%N %T %G')"
            return 0
        fi
        sleep 0.5
    done
    echo "SLURM did not come up; logs:" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    return 1
}

stop() {
    local dir=${1:?state folder}
    local pidfile pid
    for pidfile in "$dir"/run/slurmd.pid "$dir"/run/slurmctld.pid; do
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        # wait for a clean exit (slurmctld saves its state), then insist
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$dir/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
}

case "$cmd" in
    install) install ;;
    start) install; start "${2:?state folder}" ;;
    stop) stop "${2:?state folder}" ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
