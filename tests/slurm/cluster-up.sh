#!/usr/bin/env bash
# Bring up a real SLURM cluster, with accounting, on this machine: this host
# as one node, and two more nodes emulated in network namespaces, for jobs
# that span nodes.
#
# What it does:
#   1. installs Debian's packages if any is missing (munge slurmctld slurmd
#      slurm-client slurmdbd mariadb-server iproute2), without starting their
#      services;
#   2. writes /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf: partition P
#      (default debug) is this host, reached on 127.0.0.1; partition
#      P2 (default twonode) is the nodes ddpm-node1 and ddpm-node2, each a
#      network namespace of its own with its own host name (a UTS namespace),
#      address (N.11, N.12 on a bridge where this host is N.1; N defaults to
#      10.250.0), /etc/hosts (/etc/netns/NODE/hosts), slurmd port and spool
#      directory;
#   3. starts the daemons by hand, each in the foreground under setsid, and
#      records their PIDs: munged, mariadbd (the accounting database),
#      slurmdbd, slurmctld, slurmd, and slurmd@ddpm-node1, slurmd@ddpm-node2
#      in their namespaces;
#   4. waits (bounded) until a job really runs on each partition (`srun -N1
#      -n1`, `srun -N2 -n2` on two different node names) and `sacct` reports
#      it, then prints "SLURM cluster up: partition P, N CPUs; partition P2,
#      2 nodes".
# No systemd is needed (PID 1 may be anything); nothing listens for or sends
# traffic beyond loopback and the bridge to the namespaces made here.
#
# Usage (as root):
#   sudo tests/slurm/cluster-up.sh
#   sinfo; srun -n2 hostname; sbatch --wrap 'sleep 1'; sacct
#   python main.py -m hydra/launcher=slurm ...
#   sudo tests/slurm/cluster-down.sh        # stops exactly the daemons started here
#
# Running it again while the cluster is up starts nothing new: it checks the
# recorded PIDs (kill -0 and the process name) and only starts what is missing.
#
# FOR A THROWAWAY MACHINE OR CONTAINER ONLY: it installs packages, writes
# /etc/slurm/*.conf and /etc/netns/ddpm-node*/hosts, makes network namespaces,
# a bridge (ddpm-slurm0) and veth pairs, may create /etc/munge/munge.key and
# may add this host's name to /etc/hosts. It is meant for hosts where Debian's services are not
# running (containers, CI); on a systemd host stop munge, mariadb, slurmdbd,
# slurmctld and slurmd first.
#
# Environment (all optional):
#   DDPM_SLURM_DIR        state directory: PID files, logs, spool, database
#                         (default /var/lib/ddpm-slurm; must be traversable by
#                         the mysql user)
#   DDPM_SLURM_PARTITION  partition name (default debug)
#   DDPM_SLURM_CLUSTER    cluster name (default ddpm)
#   DDPM_SLURM_DB_PORT    mariadb TCP port, bound to 127.0.0.1 (default 3306)
#   DDPM_SLURM_TWO_NODE_PARTITION  the two-node partition's name (default twonode)
#   DDPM_SLURM_NODE_NET   the first three parts of the two nodes' /24 network
#                         (default 10.250.0; pick another if that one is in use)
#   DDPM_SLURM_WAIT       seconds to wait for each stage (default 60)
set -Eeuo pipefail

# shellcheck source=tests/slurm/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PARTITION=${DDPM_SLURM_PARTITION:-debug}
CLUSTER_NAME=${DDPM_SLURM_CLUSTER:-ddpm}
DB_PORT=${DDPM_SLURM_DB_PORT:-3306}
WAIT_S=${DDPM_SLURM_WAIT:-60}
TWO_NODE_PARTITION=${DDPM_SLURM_TWO_NODE_PARTITION:-twonode}

CONF_DIR=/etc/slurm
RUN_DIR=$STATE_DIR/run
DB_DIR=$STATE_DIR/mysql
DB_RUN_DIR=$STATE_DIR/mysql-run
DB_SOCKET=$DB_RUN_DIR/mysqld.sock
DB_NAME=slurm_acct_db
DB_USER=slurm
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server iproute2)

T0=$SECONDS
say() { printf '[cluster-up %3ds] %s\n' "$((SECONDS - T0))" "$*"; }

# Print the tail of a daemon's logs (its own log file and its stdout/stderr); a slurmd's log is named after
# its node.
show_logs() {
    local name log f
    for name in "$@"; do
        log=$name
        [[ $name == slurmd ]] && log=slurmd-${HOST:-}
        [[ $name == slurmd@* ]] && log=slurmd-${name#slurmd@}
        for f in "$LOG_DIR/$log.log" "$LOG_DIR/$name.out"; do
            [[ -s $f ]] || continue
            echo "----- tail of $f -----" >&2
            tail -n 40 "$f" >&2
        done
    done
}

# fail MESSAGE [DAEMON...]: print MESSAGE and the named daemons' logs, exit 1.
fail() {
    local msg=$1; shift
    trap - ERR
    echo "cluster-up: ERROR: $msg" >&2
    show_logs "$@"
    echo "cluster-up: logs are in $LOG_DIR; stop what was started with tests/slurm/cluster-down.sh" >&2
    exit 1
}
trap 'fail "command failed at line $LINENO: $BASH_COMMAND"' ERR

# start NAME CMD...: start CMD (which must exec a process called NAME and stay
# in the foreground) in its own session, record its PID. setsid does not fork
# here (a background job of a script is not a process-group leader) and
# setpriv/the daemons exec in place, so $! is the daemon's own PID.
start() {
    local name=$1; shift
    if alive "$name"; then
        say "$name already running (pid $(<"$PID_DIR/$name.pid"))"
        return 0
    fi
    rm -f "$PID_DIR/$name.pid"
    say "starting $name"
    setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 9>&- &
    echo $! >"$PID_DIR/$name.pid"
}

# wait_for NAME WHAT CMD...: poll CMD until it succeeds; fail if daemon NAME
# dies or WAIT_S seconds pass.
wait_for() {
    local name=$1 what=$2; shift 2
    local deadline=$((SECONDS + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        sleep 0.5
        if ! alive "$name"; then
            # a daemon that is still execing has not got its final name yet
            sleep 1
            alive "$name" || fail "$name exited while waiting for $what" "$name"
        fi
        ((SECONDS < deadline)) || fail "timed out after ${WAIT_S}s waiting for $what" "$name"
    done
}

[[ $EUID -eq 0 ]] || { echo "cluster-up: must run as root (sudo $0)" >&2; exit 1; }

# The lock keeps two cluster-up runs from racing; daemons get fd 9 closed.
install -d -m 755 "$STATE_DIR"
exec 9>"$STATE_DIR/lock"
flock -w 300 9 || fail "another cluster-up.sh holds $STATE_DIR/lock"

# --- 1. packages ---------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    # Keep apt from starting Debian's own services (they would collide with
    # the daemons started below), unless a policy already exists.
    own_policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt_ok=1
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
        </dev/null >"/tmp/ddpm-slurm-apt.$$.log" 2>&1 || apt_ok=
    [[ -n $own_policy ]] && rm -f /usr/sbin/policy-rc.d
    if [[ -z $apt_ok ]]; then
        tail -n 30 "/tmp/ddpm-slurm-apt.$$.log" >&2
        fail "apt-get install failed (full log: /tmp/ddpm-slurm-apt.$$.log)"
    fi
    rm -f "/tmp/ddpm-slurm-apt.$$.log"
    say "packages installed"
else
    say "packages already installed"
fi

# --- 2. directories, host name, keys, configuration ------------------------
install -d -m 755 "$STATE_DIR" "$PID_DIR" "$LOG_DIR" "$RUN_DIR" \
    "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$CONF_DIR"
install -d -m 750 -o mysql -g mysql "$DB_DIR" "$DB_RUN_DIR"
install -d -m 755 -o munge -g munge /run/munge

HOST=$(hostname -s)
if ! getent hosts "$(hostname)" >/dev/null; then
    say "adding $(hostname) to /etc/hosts"
    echo "127.0.0.1 $(hostname) $HOST" >>/etc/hosts
fi
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts

# The two emulated nodes: a bridge with this host on it, and per node a network namespace joined to it by a
# veth pair. Each node's /etc/hosts (/etc/netns/<node>/hosts, put in place of this host's for its slurmd below)
# names both nodes and this host (the controller) by their bridge addresses, as a cluster's name service
# would. Idempotent.
ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
ip addr replace "$NODE_NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for node in "${NET_NODES[@]}"; do
    veth=$(node_veth "$node")
    [[ -e /run/netns/$node ]] || ip netns add "$node"
    if ! ip -n "$node" link show eth0 >/dev/null 2>&1; then
        ip link del "$veth" 2>/dev/null || true
        ip link add "$veth" type veth peer name "$veth-peer"
        ip link set "$veth-peer" netns "$node"
        ip -n "$node" link set "$veth-peer" name eth0
    fi
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip -n "$node" addr replace "$(node_address "$node")/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    install -d -m 755 "/etc/netns/$node"
    {
        echo "127.0.0.1 localhost"
        echo "$NODE_NET.1 $(hostname) $HOST"
        for other in "${NET_NODES[@]}"; do echo "$(node_address "$other") $other"; done
    } >"/etc/netns/$node/hosts"
done

if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    install -d -m 700 -o munge -g munge /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

# Accounting database password: made once, kept in the state directory.
if [[ ! -s $STATE_DIR/db-password ]]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE_DIR/db-password")
fi
DB_PASS=$(<"$STATE_DIR/db-password")

# Node size: what slurmd detects, with the CPU count from nproc and memory a
# little under what is there (slurmd drains a node that reports less than its
# RealMemory).
declare -A hw=()
for kv in $(slurmd -C | head -n 1); do hw[${kv%%=*}]=${kv#*=}; done
NCPUS=$(nproc)
MEM_MB=${hw[RealMemory]:-1024}
REAL_MEM=$((MEM_MB * 95 / 100))
if [[ ${hw[CPUs]:-} == "$NCPUS" && -n ${hw[CoresPerSocket]:-} ]]; then
    NODE_HW="CPUs=$NCPUS Boards=${hw[Boards]:-1} SocketsPerBoard=${hw[SocketsPerBoard]:-1} CoresPerSocket=${hw[CoresPerSocket]} ThreadsPerCore=${hw[ThreadsPerCore]:-1}"
else
    NODE_HW="CPUs=$NCPUS"   # e.g. a CPU-limited container: trust nproc
fi

# write_file PATH MODE: replace PATH with stdin if different; returns 0 if changed.
write_file() {
    local path=$1 mode=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
        chmod "$mode" "$path"
        return 1
    fi
    mv -f "$tmp" "$path"
}

# The emulated nodes: the same hardware as this host, each at its own address and slurmd port.
NET_NODE_LINES=$(for node in "${NET_NODES[@]}"; do
    echo "NodeName=$node NodeAddr=$(node_address "$node") Port=$(node_port "$node") $NODE_HW RealMemory=$REAL_MEM State=UNKNOWN"
done)
slurm_conf_changed=
# shellcheck disable=SC2015  # write_file returns 1 when nothing changed
write_file "$CONF_DIR/slurm.conf" 644 <<EOF && slurm_conf_changed=1 || true
# Written by tests/slurm/cluster-up.sh: partition $PARTITION is this host ($HOST on 127.0.0.1);
# partition $TWO_NODE_PARTITION is two nodes emulated in network namespaces (${NET_NODES[*]}).
ClusterName=$CLUSTER_NAME
# No address: every node reaches the controller by the address its own /etc/hosts gives this host's name.
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again once its old credential expired (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job with no memory request takes the whole node.
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/slurmctld
# %n: the node's name (several slurmd share this file)
SlurmdSpoolDir=$STATE_DIR/slurmd/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 $NODE_HW RealMemory=$REAL_MEM State=UNKNOWN
$NET_NODE_LINES
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=$TWO_NODE_PARTITION Nodes=$(IFS=,; echo "${NET_NODES[*]}") Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# slurmdbd refuses a slurmdbd.conf that others can read: mode 600.
write_file "$CONF_DIR/slurmdbd.conf" 600 <<EOF || true
# Written by tests/slurm/cluster-up.sh
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF

# --- 3. daemons ----------------------------------------------------------
# munge: authentication for everything below.
touch "$LOG_DIR/munged.log"
chown munge:munge "$LOG_DIR/munged.log"
start munged setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --log-file="$LOG_DIR/munged.log"
munge_ok() { munge -n </dev/null | unmunge; }
wait_for munged "munged to answer" munge_ok

# mariadb: the accounting database, on 127.0.0.1 only. The InnoDB sizes are
# the least slurmdbd does not warn about (the buffer pool is touched lazily).
if [[ ! -d $DB_DIR/mysql ]]; then
    say "initialising the database in $DB_DIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$LOG_DIR/mariadb-install-db.log" 2>&1 \
        || fail "mariadb-install-db failed" mariadb-install-db
fi
start mariadbd mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
    --socket="$DB_SOCKET" --pid-file="$DB_RUN_DIR/mariadbd.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" \
    --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900
wait_for mariadbd "mariadbd to answer" mariadb-admin --socket="$DB_SOCKET" -u root ping
say "creating database $DB_NAME and user $DB_USER"
mariadb --socket="$DB_SOCKET" -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF

# slurmdbd, then register the cluster (slurmctld would also do it on its
# first connection; doing it here makes sacct usable at once).
start slurmdbd slurmdbd -D
wait_for slurmdbd "slurmdbd to answer" timeout 10 sacctmgr -n list cluster
if [[ -z $(timeout 10 sacctmgr -n -P list cluster "$CLUSTER_NAME" format=Cluster) ]]; then
    say "registering cluster $CLUSTER_NAME in the accounting database"
    timeout 20 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null \
        || fail "sacctmgr add cluster failed" slurmdbd
fi

# slurmctld, then the slurmd of this host and those of the two emulated nodes: each in its network namespace,
# under its node's host name (a UTS namespace) and with its node's /etc/hosts (bound over this host's in a
# mount namespace), all of which its jobs inherit. Not `ip netns exec`: that mounts a /sys without the
# cgroup file system slurmd needs.
if alive slurmctld && [[ -n $slurm_conf_changed ]]; then
    say "slurm.conf changed: scontrol reconfigure"
    timeout 20 scontrol reconfigure || true
fi
start slurmctld slurmctld -D -i
wait_for slurmctld "slurmctld to answer" timeout 10 scontrol ping
install -d -m 755 "$STATE_DIR/slurmd/$HOST"
start slurmd slurmd -D -N "$HOST"
for node in "${NET_NODES[@]}"; do
    install -d -m 755 "$STATE_DIR/slurmd/$node"
    # shellcheck disable=SC2016  # $1 expands in the inner shell
    start "slurmd@$node" nsenter --net="/run/netns/$node" unshare --uts --mount --propagation private \
        sh -c 'hostname "$1" && mount --bind "/etc/netns/$1/hosts" /etc/hosts && exec slurmd -D -N "$1"' \
        sh "$node"
done
node_responding() {
    local s
    s=$(timeout 10 sinfo -h -n "$1" -o %t) || return 1
    [[ -n $s && $s != *'*' ]]
}
wait_for slurmd "slurmd to register with slurmctld" node_responding "$HOST"
for node in "${NET_NODES[@]}"; do
    wait_for "slurmd@$node" "the slurmd of $node to register with slurmctld" node_responding "$node"
done

# --- 4. wait until usable ------------------------------------------------
# sinfo may show a node idle before its slurmd has really reconnected: only a job that ran proves it. Each try
# is bounded; a node left down or drained by an earlier run is resumed once.
#
# probe PARTITION N DAEMON:NODE...: wait until `srun -p PARTITION -N N -n N` runs on N different nodes (or all
# of them are busy with jobs); sets probe_job to the job's id.
probe() {
    local partition=$1 count=$2; shift 2
    local daemons=("${@%%:*}") nodes=("${@##*:}")
    local deadline=$((SECONDS + WAIT_S)) resumed= state= out= daemon node i
    say "waiting for a job to run on $partition (srun -N$count -n$count)"
    probe_job=
    while :; do
        for daemon in "${daemons[@]}"; do
            alive "$daemon" || fail "$daemon exited" "$daemon" slurmctld
        done
        alive slurmctld || fail "slurmctld exited" slurmctld
        state=$(sinfo -h -p "$partition" -o %T 2>/dev/null | sort -u | tr '\n' ' ') || state=
        if [[ -z $resumed && $state =~ (down|drain) ]]; then
            for node in "${nodes[@]}"; do
                say "node $node is $(sinfo -h -n "$node" -o '%T (%E)'): resuming it"
                timeout 10 scontrol update NodeName="$node" State=RESUME || true
            done
            resumed=1
        fi
        if [[ $state == 'allocated ' ]]; then
            # every CPU is busy with jobs: the nodes evidently run them
            probe_job=$(squeue -h -p "$partition" -t R -o %A | head -n 1)
            [[ -n $probe_job ]] && return 0
        fi
        if [[ $state =~ ^((idle|mixed) )+$ ]]; then
            # shellcheck disable=SC2016  # the variables expand inside the job
            out=$(timeout 20 srun -p "$partition" -N"$count" -n"$count" -t 1 -J cluster-up-probe --quiet \
                sh -c 'echo "probe-job=$SLURM_JOB_ID on=$(hostname)"' 2>&1) || true
            if [[ $out =~ probe-job=([0-9]+) ]] \
                && (($(grep -o 'on=[^ ]*' <<<"$out" | sort -u | wc -l) == count)); then
                probe_job=${BASH_REMATCH[1]}
                return 0
            fi
        fi
        ((SECONDS < deadline)) \
            || fail "no job ran on $partition within ${WAIT_S}s (node states: ${state:-unknown}; last srun: ${out:-none})" \
                "${daemons[@]}" slurmctld
        sleep 1
    done
}
probe "$PARTITION" 1 "slurmd:$HOST"
jobid=$probe_job
probe "$TWO_NODE_PARTITION" 2 "slurmd@${NET_NODES[0]}:${NET_NODES[0]}" "slurmd@${NET_NODES[1]}:${NET_NODES[1]}"
say "jobs ran; waiting for sacct to report job $jobid"
deadline=$((SECONDS + WAIT_S))
until [[ $(timeout 10 sacct -n -X -P -o JobID -j "$jobid" 2>/dev/null) == *"$jobid"* ]]; do
    ((SECONDS < deadline)) || fail "sacct does not report job $jobid after ${WAIT_S}s" slurmdbd slurmctld
    sleep 1
done

cpus=$(sinfo -h -p "$PARTITION" -o %C | awk -F/ '{print $4}')
say "ready in $((SECONDS - T0))s; state and logs in $STATE_DIR"
echo "SLURM cluster up: partition $PARTITION, $cpus CPUs; partition $TWO_NODE_PARTITION, 2 nodes (${NET_NODES[*]})"
