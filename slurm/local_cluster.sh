#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and for trying the templates.
#
#   slurm/local_cluster.sh start    install slurm + munge if missing, start munged, slurmctld
#                                   and slurmd with all state in $MEGALONG_SLURM_DIR, wait
#                                   until the node is idle
#   slurm/local_cluster.sh status   exit 0 when the cluster this script started is up
#   slurm/local_cluster.sh stop     cancel its jobs, stop the daemons it started (and only those)
#   slurm/local_cluster.sh env      print the line that points slurm commands at it
#
# Client commands find the cluster through SLURM_CONF=$MEGALONG_SLURM_DIR/slurm.conf
# (`eval "$(slurm/local_cluster.sh env)"`). Must run as root (slurmd starts jobs as their
# users). Nothing outside the state directory is written except by apt-get.
set -euo pipefail

STATE_DIR="${MEGALONG_SLURM_DIR:-/tmp/megalong-slurm}"
CONF="$STATE_DIR/slurm.conf"
PIDS="$STATE_DIR/started.pids"          # "name pid" of every daemon this script started
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
# Each CPU gets this much memory for scheduling; without a default, one job would take all
# the node's memory and jobs would run one at a time.
MEM_PER_CPU_MB="${MEGALONG_SLURM_MEM_PER_CPU_MB:-2048}"
START_TIMEOUT_S="${MEGALONG_SLURM_START_TIMEOUT_S:-60}"
# The controller's and the node daemon's TCP ports (SLURM's defaults); another pair lets a
# second cluster run beside the first (the tests start one).
CTLD_PORT="${MEGALONG_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${MEGALONG_SLURM_SLURMD_PORT:-6818}"
# Seconds a preempted job of the 'preemptible' partition gets to save before it is requeued.
PREEMPT_GRACE_S="${MEGALONG_SLURM_PREEMPT_GRACE_S:-60}"
# CPU slots the node offers. At least 4 even on a 2-core machine, so that two 2-process test
# jobs (e.g. a reference run and a preempted run) share the cores instead of queueing
# one behind the other; slurmd is told to trust this number (config_overrides).
CPU_SLOTS="${MEGALONG_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}"

say() { echo "[local_cluster] $*" >&2; }
die() { say "error: $*"; exit 1; }

# Exited daemons can linger as zombies here (nobody reaps them), so `kill -0` says "alive"
# for a dead daemon: read the state letter in /proc/PID/stat instead.
alive() {
    local pid="$1" stat
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != "Z" && "${stat:0:1}" != "X" ]]
}

pid_of() { [[ -f "$PIDS" ]] && awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -n1 || true; }

# A port in LISTEN state (0A) in /proc/net/tcp{,6}; ports are hex there.
port_busy() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p {found = 1} END {exit !found}' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

daemons_up() {
    local name
    for name in munged slurmctld slurmd; do
        alive "$(pid_of "$name")" || return 1
    done
}

node_state() { SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

conf_text() {
    local host cpus mem
    host="$(hostname -s)"
    cpus="$CPU_SLOTS"
    mem=$(( cpus * MEM_PER_CPU_MB ))
    cat <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster, all state in $STATE_DIR.
ClusterName=megalong-local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the wait before a requeued job may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$MEM_PER_CPU_MB
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
MailProg=/bin/true
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
# Seconds between SIGTERM and SIGKILL when a job ends (scancel, time limit): training saves a
# checkpoint in that time. Slurm's default.
KillWait=30
MinJobAge=300
# Preemption as sites run it: jobs of a higher PriorityTier partition preempt jobs of
# lower tiers whose partition allows it. 'preemptible' jobs are requeued after GraceTime
# seconds (SIGTERM to their steps at the start of the grace time); 'debug' (the default)
# is never preempted, so other work on this cluster is never disturbed.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# One made-up countable resource (like a site's GPUs): a 'preemptible' job holding the
# token must make way for an 'urgent' job asking for it, whatever else the node is running.
GresTypes=token
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=token:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=preemptible Nodes=$host MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$PREEMPT_GRACE_S
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start_munge() {
    install -d -m 0700 -o munge -g munge "$MUNGE_DIR"
    if [[ ! -f "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        chown munge:munge "$MUNGE_DIR/munge.key"
        chmod 0400 "$MUNGE_DIR/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_DIR/munged.pid"
    su -s /bin/sh munge -c "munged --force --socket=$MUNGE_SOCKET --key-file=$MUNGE_DIR/munge.key \
        --pid-file=$MUNGE_DIR/munged.pid --log-file=$MUNGE_DIR/munged.log --seed-file=$MUNGE_DIR/munged.seed" \
        || die "munged did not start; see $MUNGE_DIR/munged.log"
    wait_for_file "$MUNGE_DIR/munged.pid" munged
    echo "munged $(cat "$MUNGE_DIR/munged.pid")" >> "$PIDS"
}

wait_for_file() {
    local file="$1" what="$2" i
    for ((i = 0; i < START_TIMEOUT_S * 5; i++)); do
        [[ -s "$file" ]] && return 0
        sleep 0.2
    done
    die "$what did not write $file within ${START_TIMEOUT_S}s; logs are in $STATE_DIR/log"
}

start() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd starts jobs as their owners)"
    if daemons_up; then
        say "already running (state in $STATE_DIR); node is $(node_state)"
        # One started by another version of this script (or other MEGALONG_SLURM_* settings)
        # may lack settings the tests rely on (partitions, preemption).
        [[ "$(conf_text)" == "$(cat "$CONF")" ]] \
            || say "warning: it runs another configuration than this script writes; to change: $0 stop && $0 start"
        return 0
    fi
    # A second slurmctld on a busy port fails silently in the background: look first.
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        port_busy "$port" && die "port $port is already in use (another slurmctld/slurmd?); not starting"
    done
    install_if_missing
    # A previous run's leftovers (its daemons are gone) must not confuse this one. Daemons
    # that were killed leave their pid files: one read before the new daemon rewrites it
    # names a dead process, and the start fails with "a daemon exited".
    stop_ours quiet
    rm -rf "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log" "$PIDS" \
        "$STATE_DIR/slurmctld.pid" "$STATE_DIR/slurmd.pid"
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log"
    chmod 0755 "$STATE_DIR"
    : > "$PIDS"
    conf_text > "$CONF"
    # A start that fails stops what it started: a daemon left running would hold its port
    # and refuse every later start.
    trap 'stop_ours quiet' EXIT
    start_munge
    slurmctld -f "$CONF" || die "slurmctld failed; see $STATE_DIR/log/slurmctld.log"
    wait_for_file "$STATE_DIR/slurmctld.pid" slurmctld
    echo "slurmctld $(cat "$STATE_DIR/slurmctld.pid")" >> "$PIDS"
    slurmd -f "$CONF" || die "slurmd failed; see $STATE_DIR/log/slurmd.log"
    wait_for_file "$STATE_DIR/slurmd.pid" slurmd
    echo "slurmd $(cat "$STATE_DIR/slurmd.pid")" >> "$PIDS"
    local i state=""
    for ((i = 0; i < START_TIMEOUT_S * 2; i++)); do
        daemons_up || die "a daemon exited during start; logs are in $STATE_DIR/log"
        state="$(node_state)"
        if [[ "$state" == idle* ]]; then
            trap - EXIT
            say "up: node $(hostname -s) is idle; use it with: export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    die "node did not become idle within ${START_TIMEOUT_S}s (state: ${state:-unknown}); logs are in $STATE_DIR/log"
}

# Cancel every job first: job steps outlive slurmd, and a stopped controller cannot cancel.
cancel_jobs() {
    alive "$(pid_of slurmctld)" || return 0
    local jobs i
    jobs="$(SLURM_CONF="$CONF" squeue -h -o '%A' 2>/dev/null || true)"
    [[ -z "$jobs" ]] && return 0
    # shellcheck disable=SC2086
    SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
        [[ -z "$(SLURM_CONF="$CONF" squeue -h -t all -o '%A %T' 2>/dev/null | grep -v -E 'COMPLETED|CANCELLED|FAILED|TIMEOUT|PREEMPTED|NODE_FAIL|OUT_OF_MEMORY' || true)" ]] && return 0
        sleep 0.5
    done
    say "warning: some jobs were still ending after 30 s"
}

stop_ours() {
    local quiet="${1:-}" name pid i
    [[ -f "$PIDS" ]] || { [[ -n "$quiet" ]] || say "nothing to stop (no $PIDS)"; return 0; }
    cancel_jobs
    for name in slurmd slurmctld munged; do
        pid="$(pid_of "$name")"
        if alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.2; done
            alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
            [[ -n "$quiet" ]] || say "stopped $name ($pid)"
        fi
    done
    rm -f "$PIDS"
}

status() {
    if daemons_up; then
        say "running: munged $(pid_of munged), slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd); node is $(node_state)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    say "not running (state dir $STATE_DIR)"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop_ours ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state in \$MEGALONG_SLURM_DIR, default /tmp/megalong-slurm)" >&2; exit 2 ;;
esac
