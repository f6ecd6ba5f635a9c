#!/usr/bin/env bash
# Tear down the SLURM cluster started by tests/slurm/cluster-up.sh.
#
# What it does:
#   1. if slurmctld is up, cancels every job still queued or running and waits
#      (bounded) for them to end, so no job step outlives the cluster;
#   2. stops exactly the daemons cluster-up.sh recorded (the slurmd of the
#      emulated nodes and of this host, slurmctld, slurmdbd, mariadbd, munged),
#      by their PIDs only (never by name): SIGTERM, then SIGKILL after a grace
#      period; waits for each to exit and removes its PID file;
#   3. removes the emulated nodes' network namespaces, veth pairs, bridge and
#      /etc/netns/<node> directories.
# Packages, /etc/slurm, the accounting database and logs stay, so the next
# cluster-up.sh is quick and keeps the job history. Running it when nothing is
# up does nothing and succeeds.
#
# Usage (as root):
#   sudo tests/slurm/cluster-up.sh
#   ... sinfo, sbatch, python main.py -m hydra/launcher=slurm ...
#   sudo tests/slurm/cluster-down.sh
# To start from scratch afterwards, also remove the state directory
# (default /var/lib/ddpm-slurm).
#
# For a throwaway machine or container, like cluster-up.sh.
#
# Environment (all optional):
#   DDPM_SLURM_DIR    state directory used by cluster-up.sh (default /var/lib/ddpm-slurm)
#   DDPM_SLURM_GRACE  seconds to wait for a daemon after SIGTERM (default 30)
set -euo pipefail

# shellcheck source=tests/slurm/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
GRACE_S=${DDPM_SLURM_GRACE:-30}

T0=$SECONDS
say() { printf '[cluster-down %3ds] %s\n' "$((SECONDS - T0))" "$*"; }

[[ $EUID -eq 0 ]] || { echo "cluster-down: must run as root (sudo $0)" >&2; exit 1; }

# The emulated nodes' network, once their daemons are gone (a namespace's end of a veth pair goes with it).
remove_node_network() {
    local node
    for node in "${NET_NODES[@]}"; do
        if [[ -e /run/netns/$node ]]; then
            say "removing network namespace $node"
            ip netns del "$node" || status=1
        fi
        ip link del "$(node_veth "$node")" 2>/dev/null || true
        rm -rf "/etc/netns/$node"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE" || status=1
    fi
}

status=0
if [[ ! -d $PID_DIR ]]; then
    remove_node_network
    say "nothing to stop ($PID_DIR does not exist)"
    exit "$status"
fi

# Wait up to $2 seconds for PID $1 to exit.
wait_exit() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        # a zombie has exited; its parent (gone or not ours) just has not reaped it
        [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

stop() {
    local name=$1 pid
    if ! alive "$name"; then
        [[ -e $PID_DIR/$name.pid ]] && say "$name not running (stale PID file removed)"
        rm -f "$PID_DIR/$name.pid"
        return 0
    fi
    pid=$(<"$PID_DIR/$name.pid")
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" "$GRACE_S"; then
        say "$name did not exit within ${GRACE_S}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        if ! wait_exit "$pid" 10; then
            echo "cluster-down: ERROR: $name (pid $pid) is still running; see $LOG_DIR" >&2
            status=1
            return 0
        fi
    fi
    rm -f "$PID_DIR/$name.pid"
}

# 1. cancel the remaining jobs while the controller can still do it.
if alive slurmctld && alive slurmd; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ') || jobs=
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 20 scancel $jobs || true
        deadline=$((SECONDS + 30))
        while [[ -n $(timeout 10 squeue -h -t R,CG,S -o %A 2>/dev/null) ]]; do
            if ((SECONDS >= deadline)); then
                say "jobs still ending after 30s; stopping the daemons anyway"
                break
            fi
            sleep 1
        done
    fi
fi

# 2. the daemons, users of a service before the service.
for name in "${NET_NODES[@]/#/slurmd@}" slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done
# 3. the emulated nodes' network (only when no daemon of theirs is left in it).
if ((status == 0)); then
    remove_node_network
fi

if ((status == 0)); then
    say "SLURM cluster down (state, logs and database kept in $STATE_DIR)"
fi
exit "$status"
