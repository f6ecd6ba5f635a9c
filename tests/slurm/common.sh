# shellcheck shell=bash
# Shared by cluster-up.sh and cluster-down.sh (sourced, not run): where the cluster's state lives, and how a
# recorded daemon is recognized.

STATE_DIR=${DDPM_SLURM_DIR:-/var/lib/ddpm-slurm}
PID_DIR=$STATE_DIR/pids
# shellcheck disable=SC2034  # used by the scripts that source this file
LOG_DIR=$STATE_DIR/log

# The two nodes emulated in network namespaces (each namespace is named after its node): node i is
# $NODE_NET.1i on the bridge, where this host is $NODE_NET.1, through the veth pair ddpm-veth<i> (host side)
# and eth0 (in the namespace).
NODE_NET=${DDPM_SLURM_NODE_NET:-10.250.0}
# shellcheck disable=SC2034
BRIDGE=ddpm-slurm0
# shellcheck disable=SC2034
NET_NODES=(ddpm-node1 ddpm-node2)
node_number() { echo "${1#ddpm-node}"; }
node_address() { echo "$NODE_NET.1$(node_number "$1")"; }
node_veth() { echo "ddpm-veth$(node_number "$1")"; }
node_port() { echo "682$(node_number "$1")"; }   # each node's slurmd port: 6821, 6822

# A daemon is ours and alive if its recorded PID exists and still runs a process of that name (a recycled PID
# is never mistaken for it, nor signalled). NAME@NODE is the daemon NAME of one of the emulated nodes.
alive() {
    local name=$1 pid comm stat
    [[ -r $PID_DIR/$name.pid ]] || return 1
    pid=$(<"$PID_DIR/$name.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    name=${name%%@*}
    [[ $comm == "${name:0:15}" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]   # an exited daemon not yet reaped by PID 1
}

