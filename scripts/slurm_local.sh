#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying scripts/slurm_array.sh for real
# (scripts/slurm_e2e.sh uses it). Everything listens on loopback; all state, logs, the munge key
# and slurm.conf live under $SDFIX_SLURM_DIR (default /tmp/sdfix-slurm).
#
#   bash scripts/slurm_local.sh start    # installs slurm-wlm + munge with apt if missing (root)
#   export SLURM_CONF=/tmp/sdfix-slurm/slurm.conf    # for sbatch, squeue, sinfo, ...
#   bash scripts/slurm_local.sh status
#   bash scripts/slurm_local.sh stop
#
# Idempotent: start on a running cluster only waits for the node; stop on a stopped one does
# nothing. The node has this machine's cores and memory and no GPUs: jobs that ask for
# --gres=gpu must override it on the command line (slurm_e2e.sh passes --gres=none).
set -euo pipefail

dir=${SDFIX_SLURM_DIR:-/tmp/sdfix-slurm}
conf=$dir/slurm.conf
socket=$dir/munge/munge.socket
export SLURM_CONF=$conf
# Seconds to wait for the node to come up idle.
readonly START_TIMEOUT_S=60

# The pid in FILE, if that process is running.
running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  echo "installing slurm-wlm and munge (apt)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

# slurm.conf for one node named after this host, reached on 127.0.0.1. No cgroups (containers
# rarely allow them): processes are tracked by /proc, tasks are not bound, nothing is accounted.
write_conf() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  # 90% of the memory: slurmd refuses a node whose RealMemory exceeds what it measures.
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$dir"/{ctld,d,log,munge}
  cat >"$conf" <<EOF
# Made by scripts/slurm_local.sh; one node, loopback only.
ClusterName=sdfix-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if running "$dir/munge/munged.pid"; then return; fi
  if [[ ! -s $dir/munge/munge.key ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 700 "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  munged --force --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
}

node_state() { sinfo --noheader --format=%t 2>/dev/null | head -1; }

start() {
  install
  [[ -s $conf ]] || write_conf
  start_munge
  running "$dir/slurmctld.pid" || slurmctld -f "$conf"
  running "$dir/slurmd.pid" || slurmd -f "$conf"
  local waited=0 state=""
  while ((waited < START_TIMEOUT_S)); do
    state=$(node_state)
    [[ $state == idle || $state == mix || $state == alloc ]] && break
    sleep 1
    waited=$((waited + 1))
  done
  if [[ $state != idle && $state != mix && $state != alloc ]]; then
    echo "error: the node is '${state:-unknown}' after ${START_TIMEOUT_S} s; see $dir/log/" >&2
    tail -5 "$dir"/log/*.log >&2 || true
    exit 1
  fi
  echo "slurm up: node $(hostname -s) $state; export SLURM_CONF=$conf"
}

stop() {
  local pidfile
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    if running "$pidfile"; then
      local pid
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  echo "slurm stopped (state kept in $dir; rm -r it to start afresh)"
}

status() {
  local name pidfile
  for name in munged:munge/munged.pid slurmctld:slurmctld.pid slurmd:slurmd.pid; do
    pidfile=$dir/${name#*:}
    if running "$pidfile"; then echo "${name%%:*}: running ($(cat "$pidfile"))"; else echo "${name%%:*}: stopped"; fi
  done
  if running "$dir/slurmctld.pid"; then sinfo; fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
