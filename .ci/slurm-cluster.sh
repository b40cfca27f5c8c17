#!/usr/bin/env bash
# .ci/slurm-cluster.sh — install and start a real single-node SLURM cluster
# (Debian 12: slurm-wlm 22.05 + munge) on this machine, without systemd.
#
# Idempotent: safe to run any number of times. When munged, slurmctld and
# slurmd are already running with the same configuration and `sinfo` shows the
# node usable, it only prints the status and exits 0 (well under a second).
# If the generated config changed, the daemons are restarted.
# Exits non-zero with a "slurm-cluster: ERROR: ..." message on failure.
#
# Layout:
#   /etc/slurm/slurm.conf, /etc/slurm/gres.conf   (default path: the Snakemake
#       SLURM executor strips every SLURM_* variable, SLURM_CONF included)
#   /var/spool/slurmctld (state), /var/spool/slurmd (spool)
#   /var/log/slurm/slurm{ctld,d}.log, /var/log/munge/munged.log
#   /run/slurm/slurm{ctld,d}.pid,     /run/munge/munged.pid
# Node: `hostname -s`, real CPU count, RealMemory = MemTotal - 10%, one fake
# GPU (gres gpu:1 on /dev/null) so `--gpus=1` jobs schedule; partition `debug`.
# No accounting (accounting_storage/none): `sacct` does not work, use squeue /
# scontrol show job (finished jobs stay visible there for MinJobAge=600 s).
#
# Stop the cluster (in this order):
#   scancel --user=root 2>/dev/null            # optional: cancel jobs
#   kill "$(cat /run/slurm/slurmd.pid)"; kill "$(cat /run/slurm/slurmctld.pid)"
#   kill "$(cat /run/munge/munged.pid)"        # or: munged --stop (as munge)
# A full reset also removes /var/spool/slurmctld (saved jobs/node state).
#
# Env: SLURM_CLUSTER_WAIT (seconds to wait for the node, default 30).
set -euo pipefail

log() { printf 'slurm-cluster: %s\n' "$*"; }
die() { printf 'slurm-cluster: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
# The executor plugin clears these too; make our own commands behave the same.
unset SLURM_CONF SLURM_JOB_ID SLURM_JOBID 2>/dev/null || true

WAIT="${SLURM_CLUSTER_WAIT:-30}"
T0=$(date +%s)
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
GRES="$CONF_DIR/gres.conf"
RUN_DIR=/run/slurm
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_PID=/run/munge/munged.pid
LOG_DIR=/var/log/slurm

pid_alive() { # pidfile expected-comm
    local p
    [ -s "$1" ] || return 1
    p=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$p" ] && [ -d "/proc/$p" ] || return 1
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}

stop_pidfile() { # pidfile comm
    local p i
    pid_alive "$1" "$2" || return 0
    p=$(cat "$1")
    kill "$p" 2>/dev/null || true
    for i in $(seq 1 50); do [ -d "/proc/$p" ] || return 0; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
}

# Usable node states: idle, or busy with jobs from an earlier caller.
node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }
state_ok() { case "$1" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }

# ---------------------------------------------------------------- install ---
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm + munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/tmp/slurm-cluster-apt.log 2>&1 \
        || { tail -n 20 /tmp/slurm-cluster-apt.log >&2; die "apt-get update failed"; }
    apt-get install -y -qq --no-install-recommends slurm-wlm munge \
        >>/tmp/slurm-cluster-apt.log 2>&1 \
        || { tail -n 20 /tmp/slurm-cluster-apt.log >&2; die "apt-get install slurm-wlm munge failed"; }
fi
id munge >/dev/null 2>&1 || die "user 'munge' missing after install"
id slurm >/dev/null 2>&1 || die "user 'slurm' missing after install"

# ----------------------------------------------------------------- config ---
NODE=$(hostname -s)
[ -n "$NODE" ] || die "empty hostname"
CPUS=$(nproc --all)
MEM_MB=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
REAL_MEM=$(( MEM_MB * 9 / 10 ))
[ "$REAL_MEM" -gt 0 ] || die "cannot read MemTotal"
# Default memory per allocated CPU when a job does not ask (--mem/--mem-per-cpu);
# without it a job gets the whole node's memory and jobs could not overlap.
DEF_MEM=$(( REAL_MEM / CPUS / 2 ))
[ "$DEF_MEM" -gt 4096 ] && DEF_MEM=4096

NEW_CONF=$(cat <<EOF
# Written by .ci/slurm-cluster.sh — single-node CI cluster; edits are overwritten.
ClusterName=ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${DEF_MEM}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
GresTypes=gpu
NodeName=${NODE} NodeHostname=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REAL_MEM} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
)
NEW_GRES="NodeName=${NODE} Name=gpu File=/dev/null"

install -d -m 0755 "$CONF_DIR" "$RUN_DIR" "$LOG_DIR"
chown slurm:slurm "$RUN_DIR" "$LOG_DIR"
install -d -m 0755 -o slurm -g slurm /var/spool/slurmctld
install -d -m 0755 -o root -g root /var/spool/slurmd

CHANGED=0
if [ "$(cat "$CONF" 2>/dev/null || true)" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" >"$CONF.tmp" && mv -f "$CONF.tmp" "$CONF"; CHANGED=1
fi
if [ "$(cat "$GRES" 2>/dev/null || true)" != "$NEW_GRES" ]; then
    printf '%s\n' "$NEW_GRES" >"$GRES.tmp" && mv -f "$GRES.tmp" "$GRES"; CHANGED=1
fi
chmod 0644 "$CONF" "$GRES"
# Debian's slurm packages read only /etc/slurm; keep any stale cgroup.conf
# from interfering (not needed with proctrack/linuxproc + task/none).

# ------------------------------------------------------------------ munge ---
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0600 /etc/munge/munge.key
install -d -m 0755 -o munge -g munge /run/munge
install -d -m 0700 -o munge -g munge /var/log/munge
install -d -m 0711 -o munge -g munge /var/lib/munge

if ! pid_alive "$MUNGE_PID" munged || ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    stop_pidfile "$MUNGE_PID" munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged --force \
        || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 1 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1
    done
    munge -n </dev/null | unmunge >/dev/null 2>&1 \
        || die "munge credential round-trip failed (see /var/log/munge/munged.log)"
fi

# -------------------------------------------------------------- fast path ---
if [ "$CHANGED" -eq 0 ] && pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd \
   && st=$(node_state) && state_ok "$st"; then
    log "already running: node ${NODE} ${st} ($(( $(date +%s) - T0 ))s)"
    sinfo
    exit 0
fi

# ------------------------------------------------------------ (re)start ---
if [ "$CHANGED" -eq 1 ]; then
    log "configuration written to $CONF ($NODE: ${CPUS} CPUs, ${REAL_MEM} MB, gpu:1)"
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
fi

if ! pid_alive "$CTLD_PID" slurmctld; then
    log "starting slurmctld"
    # -i: ignore saved state that does not match the config (e.g. after edits)
    /usr/sbin/slurmctld -i \
        || die "slurmctld failed to start; last log lines: $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
fi
for _ in $(seq 1 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'UP' \
    || die "slurmctld not answering; last log lines: $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"

if ! pid_alive "$SLURMD_PID" slurmd; then
    log "starting slurmd"
    /usr/sbin/slurmd \
        || die "slurmd failed to start; last log lines: $(tail -n 5 "$LOG_DIR/slurmd.log" 2>/dev/null)"
fi

# ------------------------------------------------------- wait for the node ---
deadline=$(( $(date +%s) + WAIT ))
resumed=0
st=""
while :; do
    st=$(node_state || true)
    state_ok "$st" && break
    case "$st" in
        down*|drain*|drng*|fail*)
            if [ "$resumed" -eq 0 ]; then
                log "node ${NODE} is ${st}; resuming"
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        scontrol show node "$NODE" >&2 2>/dev/null || true
        tail -n 10 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
        die "node ${NODE} not usable after ${WAIT}s (state: ${st:-unknown})"
    fi
    sleep 0.5
done

log "up: node ${NODE} ${st}, ${CPUS} CPUs, ${REAL_MEM} MB, gres gpu:1, partition debug ($(( $(date +%s) - T0 ))s)"
sinfo
