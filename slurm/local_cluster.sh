#!/usr/bin/env bash
# A real Slurm cluster on THIS machine (munge, MariaDB, slurmdbd, slurmctld, and one slurmd per
# compute node), so CI and a laptop can run slurm/pretrain.sbatch, slurm/make_shards.sbatch and the
# submitit launcher against real daemons, on one node or on several. Debian/Ubuntu packages
# (slurm-wlm 22.05 on Debian 12), run as root.
#
#   bash slurm/local_cluster.sh install              # apt packages (skips with a message when not root / no apt)
#   bash slurm/local_cluster.sh start [--nodes N]    # configure + start every daemon, wait until all N nodes are idle
#   bash slurm/local_cluster.sh status [--nodes N]   # exit 0 when the cluster has N nodes and every one takes jobs
#   bash slurm/local_cluster.sh nodes                # the compute nodes: name, address, slurmd pid, state
#   bash slurm/local_cluster.sh stop                 # stop what `start` started; remove namespaces, links, bridge
#
# --nodes 1 (the default): this machine itself is the only node (its `hostname -s`).
# --nodes N (2-4): N namespaced nodes `tgdp-node1..N`. Each is a Linux UTS + network namespace with
# its own host name and its own address on a bridge (198.18.0.11, .12, ...: the range reserved for
# network tests, RFC 2544; the bridge has no route anywhere else), reached through a veth pair, and
# runs its own slurmd with its own spool, log and pid files. The controller, slurmdbd, MariaDB and
# munge run once, on this machine; the nodes reach the controller at the bridge address 198.18.0.1.
# The file system is shared by all nodes, as on a cluster; node names are written to /etc/hosts,
# which every node reads, so they resolve everywhere.
#
# `start` is idempotent: with every daemon up, the same config and usable nodes it changes nothing
# (a running cluster and its jobs are left alone; a node whose slurmd died is started again). A
# changed config (e.g. another --nodes), or a controller that is down, gives a clean restart: the
# controller starts with no jobs and the accounting database is cleared with it (a fresh slurmctld
# numbers jobs from 1 again; stale `sacct` rows would shadow new jobs).
# Why each slurm.conf value: the comments below and docs/cluster.md ("A Slurm on one machine").
set -euo pipefail

CLUSTER="${TGDP_SLURM_CLUSTER:-tgdp}"
PARTITION="${TGDP_SLURM_PARTITION:-debug}"
# CPUs each node ADVERTISES (SlurmdParameters=config_overrides lets it exceed the real core count):
# several small test jobs (a training job, a sharding array) then run side by side on 2 cores.
CPUS="${TGDP_SLURM_CPUS:-8}"
ETC="${TGDP_SLURM_ETC:-/etc/slurm}"
STATE="${TGDP_SLURM_STATE:-/var/spool/slurmctld}"
SPOOL="${TGDP_SLURM_SPOOL:-/var/spool/slurmd}"
LOGS="${TGDP_SLURM_LOGS:-/var/log/slurm}"
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS="${TGDP_SLURM_DB_PASS:-tgdp-local-only}"  # a localhost-only database of a throw-away cluster
HOST="$(hostname -s)"
PIDS=/run/tgdp-slurm
MAX_NODES=4
# Namespaced nodes: names, bridge and addresses (198.18.0.0/15 is reserved for network tests).
NODE_PREFIX=tgdp-node
BRIDGE=tgdp-br0
SUBNET=198.18.0
CONTROLLER_ADDR="$SUBNET.1"
HOSTS_MARK="# tgdp local_cluster"

say() { echo "local_cluster: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    say "$1 needs root (it writes /etc/slurm, starts system daemons and creates network namespaces); skipped"
    return 1
  fi
}

cmd_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v slurmdbd >/dev/null \
      && command -v sbatch >/dev/null && command -v munged >/dev/null && command -v mariadbd >/dev/null \
      && command -v ip >/dev/null && command -v nsenter >/dev/null; then
    return 0
  fi
  need_root "installing Slurm" || return 0
  if ! command -v apt-get >/dev/null; then
    say "no apt-get: install slurmctld slurmd slurmdbd slurm-client munge mariadb-server iproute2 yourself; Slurm tests will skip"
    return 0
  fi
  # No systemd here: installing does not start the services (policy-rc.d); `start` does.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurmdbd slurm-client munge mariadb-server iproute2 util-linux >/dev/null
  say "installed $(sinfo --version 2>/dev/null || echo slurm)"
}

# ------------------------------------------------------------------------------------- the nodes
node_names() {  # node_names N -> the compute node names, one a line
  local n=$1 i
  if [ "$n" = 1 ]; then echo "$HOST"; return; fi
  for ((i = 1; i <= n; i++)); do echo "$NODE_PREFIX$i"; done
}
node_addr() { echo "$SUBNET.$((10 + ${1#"$NODE_PREFIX"}))"; }  # tgdp-node2 -> 198.18.0.12
configured_nodes() {  # the node count of the written config (0: none written by this script)
  local n=""
  [ -f "$ETC/slurm.conf" ] && n=$(sed -n 's/^# tgdp-nodes=\([0-9]*\)$/\1/p' "$ETC/slurm.conf" | head -n1)
  echo "${n:-0}"
}

write_configs() {  # write_configs DIR N -> slurm.conf, cgroup.conf, slurmdbd.conf in DIR
  local out=$1 n=$2 proctrack=proctrack/linuxproc ctld="$HOST" nodes node_lines="" name
  # cgroup-v1 freezer usable: job processes (also setsid'd or orphaned ones) die with their job.
  # Only for one node: the Debian slurmd is not built for several slurmd per host, so several
  # nodes would share one freezer tree (the same job_J/step_S on every node) and one node ending a
  # step would kill the other nodes' processes. Namespaced nodes track the process tree instead.
  if [ "$n" = 1 ] && [ -d /sys/fs/cgroup/freezer ] && [ -w /sys/fs/cgroup/freezer ]; then
    proctrack=proctrack/cgroup
  fi
  if [ "$n" -gt 1 ]; then
    ctld="$HOST($CONTROLLER_ADDR)"  # the nodes reach the controller at the bridge address
    while read -r name; do
      node_lines+="NodeName=$name NodeAddr=$(node_addr "$name") NodeHostname=$name CPUs=$CPUS State=UNKNOWN"$'\n'
    done < <(node_names "$n")
  else
    node_lines="NodeName=$HOST CPUs=$CPUS State=UNKNOWN"$'\n'
  fi
  nodes=$(node_names "$n" | paste -sd, -)
  cat >"$out/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: a local cluster for CI and local tries. Not for production.
# tgdp-nodes=$n
ClusterName=$CLUSTER
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A job's credential expires after 10 s instead of 120 s: a requeued job restarts ~11-13 s after
# its end instead of ~121 s (needs a controller restart, not scontrol reconfigure).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE
# %n = the node's name: every slurmd of a multi-node cluster has its own spool, pid and log file.
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=$proctrack
# No CPU binding / memory constraints: the nodes advertise more CPUs than the machine has.
TaskPlugin=task/none
SlurmdParameters=config_overrides
# Jobs that become eligible later (requeued, array tasks, dependencies) start within ~2 s.
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Jobs are requeueable unless submitted with --no-requeue (submitit does not pass --requeue).
JobRequeue=1
# A node that was down comes back by itself when its slurmd registers.
ReturnToService=2
# A node whose slurmd stops answering is marked DOWN after 60 s instead of 300 s.
SlurmdTimeout=60
MailProg=/bin/true
# sacct through slurmdbd + MariaDB: without it submitit warns on every poll and job.result() can
# wait forever for a job killed before it wrote its result.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Seconds between the time-limit SIGTERM and SIGKILL (Slurm's default).
KillWait=30
${node_lines}PartitionName=$PARTITION Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$out/cgroup.conf" <<EOF
# proctrack/cgroup only: track job processes through the v1 freezer; constrain nothing.
CgroupPlugin=cgroup/v1
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  cat >"$out/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$PIDS/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
}

alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  say "gave up waiting for $what after ${seconds} s"; return 1
}

stop_daemon() {  # by the pid file this script's config names
  local name=$1 pid
  alive "$name" || { rm -f "$PIDS/$name.pid"; return 0; }
  pid=$(cat "$PIDS/$name.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$PIDS/$name.pid"; return 0; }; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$PIDS/$name.pid"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  install -d -o munge -g munge -m 0755 /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create >/dev/null; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged  # as the munge user (as root it needs --force)
  touch "$PIDS/started-munged"
  wait_for 10 "munged" bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if mariadb-admin ping >/dev/null 2>&1; then return 0; fi
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  setsid mariadbd-safe --user=mysql --bind-address=127.0.0.1 >/dev/null 2>&1 < /dev/null &
  touch "$PIDS/started-mariadb"
  wait_for 30 "MariaDB" mariadb-admin ping
}

reset_accounting_db() {
  mariadb -e "DROP DATABASE IF EXISTS $DB_NAME; CREATE DATABASE $DB_NAME;
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost'; FLUSH PRIVILEGES;"
}

# ------------------------------------------------------------------------------ the namespaces
check_namespaces() {
  if ! unshare --uts --net true 2>/dev/null; then
    say "the kernel refused a new UTS + network namespace (unshare --uts --net), which every extra node needs" \
        "(e.g. a container without CAP_SYS_ADMIN): start a one-node cluster instead (--nodes 1)"
    return 1
  fi
  if ! ip link add tgdp-probe0 type veth peer name tgdp-probe1 2>/dev/null; then
    say "the kernel refused a veth pair (ip link add ... type veth), which every extra node needs:" \
        "start a one-node cluster instead (--nodes 1)"
    return 1
  fi
  ip link del tgdp-probe0 2>/dev/null || true
}

hosts_entries() {  # hosts_entries N: this script's /etc/hosts lines (every node's namespace reads it)
  local n=$1 tmp name
  tmp=$(mktemp)
  grep -v "$HOSTS_MARK\$" /etc/hosts >"$tmp" || true
  if [ "$n" -gt 1 ]; then
    while read -r name; do echo "$(node_addr "$name") $name $HOSTS_MARK" >>"$tmp"; done < <(node_names "$n")
  fi
  cmp -s "$tmp" /etc/hosts || cat "$tmp" >/etc/hosts  # in place: /etc/hosts may be a bind mount
  rm -f "$tmp"
}

ensure_bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$CONTROLLER_ADDR/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
}

ensure_netns() {  # ensure_netns NAME: the node's network namespace, its veth pair and address
  local name=$1 host_if="tgdp-veth${1#"$NODE_PREFIX"}" addr
  addr=$(node_addr "$name")
  # (grep reads whole outputs kept in variables: `cmd | grep -q` fails under pipefail when grep
  # exits early and cmd gets SIGPIPE)
  local have; have=$(ip netns list)
  grep -q "^$name\b" <<<"$have" || ip netns add "$name"
  if ! ip link show "$host_if" >/dev/null 2>&1; then
    ip link add "$host_if" type veth peer name eth0 netns "$name"
    ip link set "$host_if" master "$BRIDGE"
  fi
  ip link set "$host_if" up
  ip -n "$name" link set lo up
  ip -n "$name" link set eth0 up
  have=$(ip -n "$name" addr show dev eth0)
  grep -q "inet $addr/" <<<"$have" || ip -n "$name" addr add "$addr/24" dev eth0
}

start_slurmd() {  # start_slurmd NAME: the node's slurmd, in its namespaces (or on this machine)
  local name=$1
  alive "slurmd-$name" && return 0
  install -d -m 0755 "$SPOOL/$name"
  if [ "$name" = "$HOST" ]; then
    slurmd -N "$name"
  else
    ensure_netns "$name"
    # Own network namespace (the node's address) + own UTS namespace (the node's host name); the
    # mount namespace stays shared: one file system, as cluster nodes share theirs.
    nsenter --net="/run/netns/$name" -- unshare --uts -- sh -c "hostname $name && exec slurmd -N $name"
  fi
}

node_state() { sinfo -h -n "$1" -o %t 2>/dev/null | head -n1; }
node_usable() {  # up and taking jobs: idle, or busy with jobs (mix / alloc / completing)
  case "$(node_state "$1")" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}
all_nodes_usable() {
  local name
  while read -r name; do node_usable "$name" || return 1; done < <(node_names "$1")
}
resume_nodes() {  # an admin-style resume for a node left down or drained (e.g. after a lost slurmd)
  local name
  while read -r name; do
    node_usable "$name" || scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
  done < <(node_names "$1")
}

parse_nodes() {  # parse_nodes DEFAULT ARGS... -> N
  local n=$1; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n="${2:-}"; shift; [ $# -gt 0 ] && shift ;;
      --nodes=*) n="${1#--nodes=}"; shift ;;
      *) say "unknown argument: $1"; exit 2 ;;
    esac
  done
  if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt $MAX_NODES ]; then
    say "--nodes must be 1 to $MAX_NODES, got '$n'"; exit 2
  fi
  echo "$n"
}

cmd_status() {
  local have n
  have=$(configured_nodes)
  [ "$have" -ge 1 ] || return 1
  n=$(parse_nodes "$have" "$@")
  [ "$have" = "$n" ] || return 1
  [[ "$(scontrol ping 2>/dev/null)" == *UP* ]] && all_nodes_usable "$n" && sacct -n -X -S now >/dev/null 2>&1
}

cmd_nodes() {
  local n name pid addr
  n=$(configured_nodes)
  [ "$n" -ge 1 ] || { say "no cluster configured: run start"; return 1; }
  while read -r name; do
    pid=$(cat "$PIDS/slurmd-$name.pid" 2>/dev/null || echo -)
    addr=127.0.0.1; [ "$n" -gt 1 ] && addr=$(node_addr "$name")
    echo "$name $addr slurmd=$pid state=$(node_state "$name")"
  done < <(node_names "$n")
}

stop_cluster_daemons() {
  local pidfile
  for pidfile in "$PIDS"/slurmd*.pid; do
    [ -e "$pidfile" ] && stop_daemon "$(basename "$pidfile" .pid)"
  done
  stop_daemon slurmctld; stop_daemon slurmdbd
}

remove_namespaces() {  # every node namespace this script made: its processes, veth pair, bridge
  local name pid
  for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NODE_PREFIX[0-9]*$" || true); do
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$name" 2>/dev/null || true
  done
  for name in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep '^tgdp-veth' || true); do
    ip link del "$name" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  hosts_entries 1
}

cmd_start() {
  local n name; n=$(parse_nodes 1 "$@")
  need_root "starting Slurm" || return 1
  for tool in slurmctld slurmd slurmdbd munged mariadbd; do
    command -v "$tool" >/dev/null || { say "$tool is not installed: run 'bash slurm/local_cluster.sh install'"; return 1; }
  done
  if [ "$n" -gt 1 ]; then check_namespaces || return 1; fi
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts  # the host name must resolve
  install -d -m 0755 "$PIDS" "$STATE" "$SPOOL" "$LOGS"
  local new; new=$(mktemp -d); write_configs "$new" "$n"
  local changed=0
  for f in slurm.conf cgroup.conf slurmdbd.conf; do cmp -s "$new/$f" "$ETC/$f" || changed=1; done

  start_munge
  start_mariadb
  if [ $changed = 0 ] && alive slurmctld && alive slurmdbd; then
    rm -rf "$new"
    if [ "$n" -gt 1 ]; then ensure_bridge; fi
    while read -r name; do start_slurmd "$name"; done < <(node_names "$n")
    wait_for 30 "$n idle node(s)" all_nodes_usable "$n" \
      || { resume_nodes "$n"; wait_for 30 "$n idle node(s)" all_nodes_usable "$n"; }
    return
  fi

  # Clean (re)start: new config, no old jobs, empty accounting, fresh namespaces.
  say "writing $ETC/slurm.conf ($n node(s): $(node_names "$n" | paste -sd' ' -), $CPUS CPUs each, partition $PARTITION)"
  stop_cluster_daemons
  remove_namespaces
  install -d -m 0755 "$ETC"
  install -m 0644 "$new/slurm.conf" "$ETC/slurm.conf"
  install -m 0644 "$new/cgroup.conf" "$ETC/cgroup.conf"
  install -m 0600 "$new/slurmdbd.conf" "$ETC/slurmdbd.conf"  # slurmdbd refuses a readable password file
  rm -rf "$new" "${STATE:?}"/* "${SPOOL:?}"/*
  hosts_entries "$n"
  if [ "$n" -gt 1 ]; then ensure_bridge; fi
  reset_accounting_db
  slurmdbd
  wait_for 30 "slurmdbd" sacctmgr -n show cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  slurmctld -c
  wait_for 30 "slurmctld" bash -c 'scontrol ping | grep -q UP'
  while read -r name; do start_slurmd "$name"; done < <(node_names "$n")
  # A node reads `unk` for 1-5 s after a controller start: submit only once every node is idle.
  wait_for 60 "$n idle node(s)" all_nodes_usable "$n"
  say "Slurm is up: $(sinfo -h -o '%P %D %t %c' | head -n1) (cluster $CLUSTER; $(node_names "$n" | paste -sd' ' -))"
}

cmd_stop() {
  need_root "stopping Slurm" || return 1
  stop_cluster_daemons
  remove_namespaces
  rm -f "$ETC/slurm.conf"  # `status` reads the node count from it: no cluster now
  if [ -f "$PIDS/started-mariadb" ]; then mariadb-admin shutdown >/dev/null 2>&1 || true; rm -f "$PIDS/started-mariadb"; fi
  if [ -f "$PIDS/started-munged" ]; then pkill -x munged 2>/dev/null || true; rm -f "$PIDS/started-munged"; fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) shift; cmd_status "$@" ;;
  nodes) cmd_nodes ;;
  *) echo "usage: $0 install | start [--nodes N] | status [--nodes N] | nodes | stop" >&2; exit 2 ;;
esac
