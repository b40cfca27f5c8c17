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
#   /etc/slurm/slurm.conf, /etc/slurm/gres.conf   (the compiled-in default path,
#       so no SLURM_CONF is needed: the Snakemake SLURM executor deletes every
#       SLURM_* variable when it runs inside a SLURM job)
#   /var/spool/slurmctld (state), /var/spool/slurmd (spool)
#   /var/log/slurm/slurm{ctld,d}.log, /var/log/munge/munged.log
#   /run/slurm/slurm{ctld,d}.pid,     /run/munge/munged.pid
# Node: `hostname -s`, real CPU count, RealMemory = MemTotal - 10%, one fake
# GPU (gres gpu:1 on /dev/null) so `--gpus=1` jobs schedule; partition `debug`.
# No accounting (accounting_storage/none): `sacct` does not work, use squeue /
# scontrol show job (finished jobs stay visible there for MinJobAge=600 s).
# Snakemake (executor plugin slurm 2.8) therefore needs `slurm-status-command:
# squeue`; with the default (sacct) it loses track of its jobs and never ends.
#
# Stop the cluster (in this order):
#   scancel --user=root 2>/dev/null            # optional: cancel jobs
#   kill "$(cat /run/slurm/slurmd.pid)"; kill "$(cat /run/slurm/slurmctld.pid)"
#   kill "$(cat /run/munge/munged.pid)"        # or: munged --stop (as munge)
# The next run starts slurmctld with -c (empty job state), so no reset is needed.
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
# Serialise concurrent callers (CI and tests may start this at the same time).
exec 9>/run/slurm-cluster.lock
flock -w 180 9 || die "another slurm-cluster.sh is still running (lock /run/slurm-cluster.lock)"
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
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] || return 1
    # a killed daemon can linger as a zombie until init reaps it
    case "$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1)" in Z|X|"") return 1;; esac
}
# A daemon of that name running without our pid file (started by hand/elsewhere).
# Waits up to 10 s, in case one is still shutting down (pid file already gone).
stray() {
    pid_alive "$1" "$2" && return 1
    for _ in $(seq 1 50); do pgrep -r R,S,D,T -x "$2" >/dev/null 2>&1 || return 1; sleep 0.2; done
    return 0
}

wait_pid() { # pidfile comm: a just-started daemon writes its pid file a bit later
    for _ in $(seq 1 50); do pid_alive "$1" "$2" && return 0; sleep 0.2; done
    return 1
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
if [ "$DEF_MEM" -gt 4096 ]; then DEF_MEM=4096; fi

NEW_CONF=$(cat <<EOF
# Written by .ci/slurm-cluster.sh — single-node CI cluster; edits are overwritten.
ClusterName=ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
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
    runuser -u munge -- /usr/sbin/munged --force 9>&- \
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

for d in slurmctld:"$CTLD_PID" slurmd:"$SLURMD_PID"; do
    if stray "${d#*:}" "${d%%:*}"; then
        die "a ${d%%:*} is running that this script did not start (no ${d#*:}; pids: $(pgrep -r R,S,D,T -x "${d%%:*}" | tr '\n' ' ')); stop it first"
    fi
done

if ! pid_alive "$CTLD_PID" slurmctld; then
    log "starting slurmctld"
    # -c: start from an empty job/node state. A controller that is not running
    # was killed (e.g. at the end of a CI session); its saved state can hold
    # "running" jobs that no longer exist and would block CPUs forever.
    /usr/sbin/slurmctld -c 9>&- \
        || die "slurmctld failed to start; last log lines: $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
    wait_pid "$CTLD_PID" slurmctld \
        || die "slurmctld exited; last log lines: $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
fi
for _ in $(seq 1 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'UP' \
    || die "slurmctld not answering; last log lines: $(tail -n 5 "$LOG_DIR/slurmctld.log" 2>/dev/null)"

if ! pid_alive "$SLURMD_PID" slurmd; then
    log "starting slurmd"
    SLURMD_T0=$(date +%s)
    /usr/sbin/slurmd 9>&- \
        || die "slurmd failed to start; last log lines: $(tail -n 5 "$LOG_DIR/slurmd.log" 2>/dev/null)"
    wait_pid "$SLURMD_PID" slurmd \
        || die "slurmd exited; last log lines: $(tail -n 5 "$LOG_DIR/slurmd.log" 2>/dev/null)"
fi

# ------------------------------------------------------- wait for the node ---
deadline=$(( $(date +%s) + WAIT ))
resumed=0
st=""
# Has slurmd (re)registered with slurmctld since we started it?
registered() {
    [ -z "${SLURMD_T0:-}" ] && return 0
    local t
    t=$(scontrol show node "$NODE" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2)
    [ -n "$t" ] && [ "$(date -d "$t" +%s 2>/dev/null || echo 0)" -ge $(( SLURMD_T0 - 1 )) ]
}
while :; do
    pid_alive "$SLURMD_PID" slurmd \
        || die "slurmd exited; last log lines: $(tail -n 3 "$LOG_DIR/slurmd.log" 2>/dev/null)"
    pid_alive "$CTLD_PID" slurmctld \
        || die "slurmctld exited; last log lines: $(tail -n 3 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
    st=$(node_state || true)
    state_ok "$st" && registered && break
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

# Smoke test on a cold start: one real job step through munge/slurmctld/slurmd.
if [ "$st" = idle ]; then
    timeout 30 srun --immediate=20 -N1 -n1 -t1 true >/dev/null 2>/tmp/slurm-cluster-srun.err \
        || die "test job 'srun -n1 true' failed: $(tr '\n' ' ' </tmp/slurm-cluster-srun.err)"
    for _ in $(seq 1 25); do [ "$(node_state)" = completing ] || break; sleep 0.2; done
fi

log "up: node ${NODE} ${st}, ${CPUS} CPUs, ${REAL_MEM} MB, gres gpu:1, partition debug ($(( $(date +%s) - T0 ))s)"
sinfo
