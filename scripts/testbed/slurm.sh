#!/usr/bin/env bash
# A one-node Slurm on loopback for the tests: Debian's munge, slurmctld and slurmd, all state
# under $PYHPC_SLURM_DIR (default /tmp/pyhpc-slurm), nothing in /etc touched.
#
#   scripts/testbed/slurm.sh up|down|env
#
# `env` prints the SLURM_CONF line that srun/sinfo need. Needs root and the Debian packages
# slurmctld, slurmd, slurm-client and munge (scripts/setup.sh installs them).
set -euo pipefail

STATE="${PYHPC_SLURM_DIR:-/tmp/pyhpc-slurm}"
CONF="$STATE/slurm.conf"
log() { printf '[slurm %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'slurm.sh: error: %s\n' "$*" >&2; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  [[ $(id -u) == 0 ]] || die "needs root (slurmd runs jobs as their users)"
  for b in munged slurmctld slurmd srun; do
    command -v "$b" >/dev/null || die "$b is not installed (apt-get install slurmctld slurmd slurm-client munge)"
  done
  mkdir -p "$STATE"/{spool,ctld,log,run}
  chmod 0755 "$STATE"
  if ! pid_alive "$STATE/run/munged.pid"; then
    install -d -m 0700 -o munge -g munge "$STATE/munge" 2>/dev/null || install -d -m 0700 "$STATE/munge"
    [[ -f "$STATE/munge/munge.key" ]] || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$STATE/munge/munge.key"
    munged --force --socket="$STATE/munge/munge.sock" --key-file="$STATE/munge/munge.key" \
      --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
      --seed-file="$STATE/munge/seed"
    log "munged started"
  fi
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  cat >"$CONF" <<EOF
ClusterName=pyhpc-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  export SLURM_CONF="$CONF"
  pid_alive "$STATE/run/slurmctld.pid" || { slurmctld -f "$CONF"; log "slurmctld started"; }
  pid_alive "$STATE/run/slurmd.pid" || { slurmd -f "$CONF"; log "slurmd started"; }
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      log "ready: $(sinfo -h -o '%N %T %c')"
      return 0
    fi
    sleep 0.5
  done
  die "the node did not come up: $(sinfo 2>&1 | tail -2); see $STATE/log"
}

down() {
  local f
  for f in slurmd slurmctld munged; do
    if pid_alive "$STATE/run/$f.pid"; then
      kill "$(cat "$STATE/run/$f.pid")" 2>/dev/null || true
    fi
  done
  sleep 1
  log "stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "SLURM_CONF=$CONF" ;;
  *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
