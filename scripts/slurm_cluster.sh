#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for developing and testing the vtw SLURM flows (CI runs it as root).
#
#   scripts/slurm_cluster.sh start    # install Debian's slurmctld/slurmd/munge if missing, start munged, slurmctld,
#                                      # slurmd; wait until the node is idle. Does nothing if this script's cluster
#                                      # is already up; leaves alone a cluster it did not start.
#   scripts/slurm_cluster.sh stop     # cancel the cluster's jobs, stop the daemons this script started (by PID)
#   scripts/slurm_cluster.sh status   # exit 0 when `sinfo` answers
#
# No cgroups, no accounting: proctrack/linuxproc, task/none, jobacct_gather/none, accounting_storage/none,
# select/cons_tres with CR_Core. Settings through the environment:
#   VTW_SLURM_CPUS (default 2)        CPUs of the node
#   VTW_SLURM_PARTITION (default debug)
#   VTW_SLURM_STATE (default /var/lib/vtw-slurm)  PID files, logs, spool and state of this cluster
# The slurm.conf is written to /etc/slurm/slurm.conf, marked as ours; a slurm.conf written by someone else is never
# overwritten (start refuses instead).
set -euo pipefail

STATE_DIR=${VTW_SLURM_STATE:-/var/lib/vtw-slurm}
CPUS=${VTW_SLURM_CPUS:-2}
PARTITION=${VTW_SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MARK="# Written by vtw scripts/slurm_cluster.sh (one-node test cluster)."
STARTED="$STATE_DIR/started"   # lines "<name> <pid>" of the daemons this script started
NODE=$(hostname -s)

log() { echo "[slurm_cluster] $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it starts munged, slurmctld and slurmd)"; }

sinfo_ok() { timeout 10 sinfo -h >/dev/null 2>&1; }

# alive NAME PID: the process PID exists and its command name is NAME (guards against reused PIDs).
alive() { [[ -r /proc/$2/comm ]] && [[ $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]; }

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
    fi
}

record() { echo "$1 $2" >>"$STARTED"; }

pid_from_file() {  # pid_from_file FILE: wait up to 10 s for a daemon's PID file
    local _
    for _ in $(seq 50); do
        [[ -s $1 ]] && { cat "$1"; return 0; }
        sleep 0.2
    done
    return 1
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already answers; using it"
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "generating /etc/munge/munge.key"
        install -d -m 700 -o munge -g munge /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -m 755 -o munge -g munge /run/munge /var/lib/munge /var/log/munge
    rm -f "$STATE_DIR/munged.pid"
    munged --force --pid-file="$STATE_DIR/munged.pid" --log-file="$STATE_DIR/log/munged.log"
    local pid
    pid=$(pid_from_file "$STATE_DIR/munged.pid") || die "munged did not start; see $STATE_DIR/log/munged.log"
    record munged "$pid"
    munge -n | unmunge >/dev/null || die "munge does not work; see $STATE_DIR/log/munged.log"
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it (move it away to use this script)"
    fi
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=vtwtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

ours_running() {
    [[ -s $STARTED ]] || return 1
    local name pid
    while read -r name pid; do
        [[ $name == munged ]] && continue
        alive "$name" "$pid" || return 1
    done <"$STARTED"
    return 0
}

wait_idle() {
    local _ state
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
        case $state in
            idle* | mixed* | allocated*) log "node $NODE is $state"; return 0 ;;
            down* | drain* | fail*)
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE did not become idle (state '${state:-?}'); see $STATE_DIR/log/"
}

cmd_start() {
    need_root
    install_packages
    if ours_running && sinfo_ok; then
        log "already running"
        wait_idle
        return 0
    fi
    if sinfo_ok && ! [[ -s $STARTED ]]; then
        log "a SLURM cluster not started by this script answers already; leaving it alone"
        return 0
    fi
    # Whatever is left of a previous start of ours (a daemon that died) is stopped first.
    [[ -s $STARTED ]] && cmd_stop
    mkdir -p "$STATE_DIR/log" "$STATE_DIR/ctld" "$STATE_DIR/d"
    : >"$STARTED"
    start_munge
    write_conf
    rm -f "$STATE_DIR/slurmctld.pid" "$STATE_DIR/slurmd.pid"
    # -c: start from a clean state (no jobs left over from an earlier run of this test cluster).
    local pid
    slurmctld -c
    pid=$(pid_from_file "$STATE_DIR/slurmctld.pid") || die "slurmctld did not start; see $STATE_DIR/log/slurmctld.log"
    record slurmctld "$pid"
    slurmd -N "$NODE"
    pid=$(pid_from_file "$STATE_DIR/slurmd.pid") || die "slurmd did not start; see $STATE_DIR/log/slurmd.log"
    record slurmd "$pid"
    wait_idle
    log "started (state in $STATE_DIR; stop with: $0 stop)"
}

stop_pid() {  # stop_pid NAME PID: TERM, wait up to 10 s, then KILL
    local _
    alive "$1" "$2" || return 0
    kill -TERM "$2" 2>/dev/null || true
    for _ in $(seq 50); do
        alive "$1" "$2" || { log "stopped $1 ($2)"; return 0; }
        sleep 0.2
    done
    kill -KILL "$2" 2>/dev/null || true
    log "killed $1 ($2)"
}

cmd_stop() {
    need_root
    if [[ ! -s $STARTED ]]; then
        log "nothing started by this script"
        return 0
    fi
    # The cluster is ours, so are its jobs: cancel them so that no job step outlives the daemons.
    if sinfo_ok; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 40); do
                [[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    local name pid
    # Reverse order: slurmd, slurmctld, munged.
    tac "$STARTED" | while read -r name pid; do
        stop_pid "$name" "$pid"
    done
    rm -f "$STARTED"
}

cmd_status() {
    local name pid
    if [[ -s $STARTED ]]; then
        while read -r name pid; do
            if alive "$name" "$pid"; then log "$name ($pid) running"; else log "$name ($pid) not running"; fi
        done <"$STARTED"
    else
        log "no daemons started by this script"
    fi
    if sinfo_ok; then
        sinfo
        return 0
    fi
    log "sinfo does not answer: no SLURM cluster"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
