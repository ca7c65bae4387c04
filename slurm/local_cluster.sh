#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the launcher.
#
#   slurm/local_cluster.sh [start] [NODES]   install (Debian packages) + start; default 2 nodes
#   slurm/local_cluster.sh stop              stop every daemon and remove the state directory
#   slurm/local_cluster.sh status            print sinfo, exit 1 when the cluster is not up
#
# Each emulated node is one slurmd started with `-N nN` on its own port (Debian's Slurm
# 22.05 is built with multiple-slurmd support). Node names n1, n2, ... do not resolve:
# the launcher falls back to MASTER_ADDR=127.0.0.1. State lives in $SIMMATCH_SLURM_DIR
# (default /tmp/simmatch-slurm). Needs root and apt (Debian 12). Idempotent: `start` on a
# running cluster of the same size does nothing; of another size, restarts it.
set -euo pipefail

DIR="${SIMMATCH_SLURM_DIR:-/tmp/simmatch-slurm}"
CONF="$DIR/slurm.conf"
BASE_PORT="${SIMMATCH_SLURM_PORT:-17800}"   # slurmctld; slurmd nK listens on BASE_PORT+K
export SLURM_CONF="$CONF"

log() { echo "local_cluster: $*" >&2; }
die() { echo "local_cluster: error: $*" >&2; exit 2; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "not root: cannot install ${missing[*]}"
    command -v apt-get >/dev/null || die "no apt-get: cannot install ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # Package scripts must not start daemons on their own: we start them with our config.
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$created" -eq 1 ] && rm -f "$policy"
    return 0
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then return 0; fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    local owner=root
    id munge >/dev/null 2>&1 && owner=munge
    chown -R "$owner:$owner" /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
    # The daemon must not inherit the caller's open files: munged keeps them, and a caller
    # holding `flock /tmp/slurm-cluster.lock` would leave the lock held for as long as it runs.
    if [ "$owner" = munge ]; then (close_inherited_fds; runuser -u munge -- /usr/sbin/munged)
    else (close_inherited_fds; /usr/sbin/munged --force); fi
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start"
}

close_inherited_fds() {
    local fd
    for fd in $(ls /proc/$BASHPID/fd); do
        [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null
    done
    return 0
}

write_conf() {
    local nodes=$1 host mem cpus first
    host=$(hostname -s)
    cpus=$(nproc)
    [ "$cpus" -lt 2 ] && cpus=2
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
    # A new first job id on every start: a reused submitit folder never sees a stale result.
    first=$(( ($(date +%s) % 670000) * 100 + 1 ))
    mkdir -p "$DIR/state" "$DIR/log"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: $nodes emulated nodes on $host.
ClusterName=simmatch
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$BASE_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job's credential would otherwise block its restart for 120 s (5: it runs again ~7 s after a requeue).
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool.%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
# No accounting: sacct does not work here, the launcher's tools read scontrol instead.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
FirstJobId=$first
KillWait=5
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
# Preemption: a job in partition "urgent" preempts jobs in "debug" (the default). The
# preempted job gets its --signal (USR2 from submitit: preempt_send_user_signal) and
# SIGTERM, saves, and requeues itself; after GraceTime SLURM would requeue it anyway.
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
EOF
    local k
    for k in $(seq "$nodes"); do
        echo "NodeName=n$k NodeHostname=$host NodeAddr=127.0.0.1 Port=$((BASE_PORT + k)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60" >>"$CONF"
    echo "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF" >>"$CONF"
    echo "$nodes" >"$DIR/nodes"
}

link_conf() {
    # Clients find the cluster without SLURM_CONF when Debian's default path is free.
    local default=/etc/slurm/slurm.conf
    if [ ! -e "$default" ] || [ "$(readlink "$default" 2>/dev/null)" = "$CONF" ]; then
        mkdir -p /etc/slurm && ln -sfn "$CONF" "$default"
    else
        log "note: $default is another cluster's; export SLURM_CONF=$CONF to use this one"
    fi
}

stop_cluster() {
    local f pid
    [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ] && rm -f /etc/slurm/slurm.conf
    for f in "$DIR"/slurmd.*.pid "$DIR"/slurmctld.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        # only our daemons: a stale pid file may name a reused pid
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in slurmd|slurmctld) ;; *) continue ;; esac
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
}

running_nodes() {
    # Number of nodes of the running cluster, 0 when it is not up.
    [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || { echo 0; return; }
    [ -f "$DIR/nodes" ] && cat "$DIR/nodes" || echo 0
}

wait_idle() {
    local nodes=$1 idle
    for _ in $(seq 300); do
        idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | awk '$2 == "idle" {n++} END {print n + 0}')
        [ "$idle" -ge "$nodes" ] && return 0
        sleep 0.2
    done
    sinfo -N >&2 || true
    die "nodes did not become idle (logs in $DIR/log)"
}

start_cluster() {
    local nodes=${1:-2} k
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, got '$nodes'"
    install_packages
    if [ "$(running_nodes)" = "$nodes" ] && sinfo -h >/dev/null 2>&1; then
        wait_idle "$nodes"
        link_conf
        log "already running with $nodes nodes (SLURM_CONF=$CONF)"
        return 0
    fi
    stop_cluster
    start_munge
    write_conf "$nodes"
    slurmctld -c -f "$CONF"   # -c: no jobs from an earlier cluster
    for k in $(seq "$nodes"); do slurmd -N "n$k" -f "$CONF"; done
    wait_idle "$nodes"
    link_conf
    log "up: $nodes nodes (SLURM_CONF=$CONF)"
}

case "${1:-start}" in
    start) start_cluster "${2:-2}" ;;
    stop) stop_cluster; log "stopped" ;;
    status) [ "$(running_nodes)" != 0 ] && sinfo -N || { log "not running"; exit 1; } ;;
    [0-9]*) start_cluster "$1" ;;
    *) die "usage: $0 [start [NODES] | stop | status]" ;;
esac
