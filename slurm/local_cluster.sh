#!/usr/bin/env bash
# A real one-node Slurm on THIS machine (munge, MariaDB, slurmdbd, slurmctld, slurmd), so CI and a
# laptop can run slurm/pretrain.sbatch, slurm/make_shards.sbatch and the submitit launcher against
# real daemons. Debian/Ubuntu packages (slurm-wlm 22.05 on Debian 12), run as root.
#
#   bash slurm/local_cluster.sh install   # apt packages (skips with a message when not root / no apt)
#   bash slurm/local_cluster.sh start     # configure + start every daemon, wait for an idle node
#   bash slurm/local_cluster.sh status    # exit 0 when the node accepts jobs
#   bash slurm/local_cluster.sh stop      # stop the daemons this script started (by pid file)
#
# `start` is idempotent: with every daemon up, the same config and a usable node it changes nothing
# (a running cluster and its jobs are left alone). A changed config, or a controller that is down,
# gives a clean restart: the controller starts with no jobs and the accounting database is cleared
# with it (a fresh slurmctld numbers jobs from 1 again; stale `sacct` rows would shadow new jobs).
# Why each slurm.conf value: the comments below and docs/cluster.md ("A Slurm on one machine").
set -euo pipefail

CLUSTER="${TGDP_SLURM_CLUSTER:-tgdp}"
PARTITION="${TGDP_SLURM_PARTITION:-debug}"
# CPUs the node ADVERTISES (SlurmdParameters=config_overrides lets it exceed the real core count):
# several small test jobs (a training job, a sharding array) then run side by side on 2 cores.
CPUS="${TGDP_SLURM_CPUS:-8}"
ETC="${TGDP_SLURM_ETC:-/etc/slurm}"
STATE="${TGDP_SLURM_STATE:-/var/spool/slurmctld}"
SPOOL="${TGDP_SLURM_SPOOL:-/var/spool/slurmd}"
LOGS="${TGDP_SLURM_LOGS:-/var/log/slurm}"
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS="${TGDP_SLURM_DB_PASS:-tgdp-local-only}"  # a localhost-only database of a throw-away cluster
NODE="$(hostname -s)"
PIDS=/run/tgdp-slurm

say() { echo "local_cluster: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    say "$1 needs root (it writes /etc/slurm and starts system daemons); skipped"
    return 1
  fi
}

cmd_install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v slurmdbd >/dev/null \
      && command -v sbatch >/dev/null && command -v munged >/dev/null && command -v mariadbd >/dev/null; then
    return 0
  fi
  need_root "installing Slurm" || return 0
  if ! command -v apt-get >/dev/null; then
    say "no apt-get: install slurmctld slurmd slurmdbd slurm-client munge mariadb-server yourself; Slurm tests will skip"
    return 0
  fi
  # No systemd here: installing does not start the services (policy-rc.d); `start` does.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurmdbd slurm-client munge mariadb-server >/dev/null
  say "installed $(sinfo --version)"
}

write_configs() {  # -> files in $1
  local out=$1 proctrack=proctrack/linuxproc
  # cgroup-v1 freezer usable: job processes (also setsid'd or orphaned ones) die with their job.
  # Without it linuxproc tracks the process tree only.
  if [ -d /sys/fs/cgroup/freezer ] && [ -w /sys/fs/cgroup/freezer ]; then proctrack=proctrack/cgroup; fi
  cat >"$out/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: a one-node cluster for CI and local tries. Not for production.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A job's credential expires after 10 s instead of 120 s: a requeued job restarts ~11-13 s after
# its end instead of ~121 s (needs a controller restart, not scontrol reconfigure).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$( [ "$proctrack" = proctrack/cgroup ] && echo "ProctrackType=proctrack/cgroup" || echo "ProctrackType=proctrack/linuxproc")
# No CPU binding / memory constraints: the node advertises more CPUs than it has.
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
MailProg=/bin/true
# sacct through slurmdbd + MariaDB: without it submitit warns on every poll and job.result() can
# wait forever for a job killed before it wrote its result.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Seconds between the time-limit SIGTERM and SIGKILL (Slurm's default).
KillWait=30
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
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
  alive "$name" || return 0
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
  wait_for 10 "munged" bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if mariadb-admin ping >/dev/null 2>&1; then return 0; fi
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  setsid mariadbd-safe --user=mysql --bind-address=127.0.0.1 >/dev/null 2>&1 < /dev/null &
  wait_for 30 "MariaDB" mariadb-admin ping
}

reset_accounting_db() {
  mariadb -e "DROP DATABASE IF EXISTS $DB_NAME; CREATE DATABASE $DB_NAME;
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost'; FLUSH PRIVILEGES;"
}

node_usable() {
  local state
  state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1)
  case "$state" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

cmd_status() {
  scontrol ping 2>/dev/null | grep -q UP && node_usable && sacct -n -X -S now >/dev/null 2>&1
}

cmd_start() {
  need_root "starting Slurm" || return 1
  for tool in slurmctld slurmd slurmdbd munged mariadbd; do
    command -v "$tool" >/dev/null || { say "$tool is not installed: run 'bash slurm/local_cluster.sh install'"; return 1; }
  done
  getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts  # the node name must resolve
  install -d -m 0755 "$PIDS" "$STATE" "$SPOOL" "$LOGS"
  local new; new=$(mktemp -d); write_configs "$new"
  local changed=0
  for f in slurm.conf cgroup.conf slurmdbd.conf; do cmp -s "$new/$f" "$ETC/$f" || changed=1; done

  start_munge
  start_mariadb
  if [ $changed = 0 ] && alive slurmctld && alive slurmdbd; then
    alive slurmd || slurmd
    rm -rf "$new"
    wait_for 30 "an idle node" node_usable || { scontrol update nodename="$NODE" state=resume || true; wait_for 10 "an idle node" node_usable; }
    return 0
  fi

  # Clean (re)start: new config, no old jobs, empty accounting.
  [ $changed = 1 ] && say "writing $ETC/slurm.conf (node $NODE, $CPUS CPUs, partition $PARTITION)"
  stop_daemon slurmd; stop_daemon slurmctld; stop_daemon slurmdbd
  install -d -m 0755 "$ETC"
  install -m 0644 "$new/slurm.conf" "$ETC/slurm.conf"
  install -m 0644 "$new/cgroup.conf" "$ETC/cgroup.conf"
  install -m 0600 "$new/slurmdbd.conf" "$ETC/slurmdbd.conf"  # slurmdbd refuses a readable password file
  rm -rf "$new" "${STATE:?}"/* "${SPOOL:?}"/*
  reset_accounting_db
  slurmdbd
  wait_for 30 "slurmdbd" sacctmgr -n show cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  slurmctld -c
  slurmd
  wait_for 30 "slurmctld" bash -c 'scontrol ping | grep -q UP'
  # The node reads `unk` for 1-5 s after a controller start: submit only once it is idle.
  wait_for 30 "an idle node" node_usable
  say "Slurm is up: $(sinfo -h -o '%P %D %t %c' | head -n1) (cluster $CLUSTER)"
}

cmd_stop() {
  stop_daemon slurmd; stop_daemon slurmctld; stop_daemon slurmdbd
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
