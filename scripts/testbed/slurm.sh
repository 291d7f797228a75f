#!/usr/bin/env bash
# Slurm on loopback for the tests: Debian's munge, slurmctld and slurmd, all state under
# $PYHPC_SLURM_DIR (default /var/tmp/pyhpc-slurm), nothing in /etc touched.
#
#   scripts/testbed/slurm.sh up [N]|down|env
#
# N = 1 (the default): one slurmd, this machine's own node. N > 1: N nodes, node1..nodeN, each
# slurmd in a network namespace of its own (pyhpc-slurm-I, address 10.97.0.I on a bridge; this
# machine reaches them as 10.97.0.254, where slurmctld listens) and a mount namespace whose /tmp
# keeps the node's own writes (an overlay on this machine's /tmp: Slurm's PMIx plugin makes
# per-step directories there that two nodes on one machine would share). The state dir must not
# be under /tmp for that reason.
# `env` prints the SLURM_CONF line that srun/sinfo need. Needs root and the Debian packages
# slurmctld, slurmd, slurm-client, munge and libpmix-dev (scripts/setup.sh installs them).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
STATE="${PYHPC_SLURM_DIR:-/var/tmp/pyhpc-slurm}"
NET=10.97.0
CONF="$STATE/slurm.conf"
log() { printf '[slurm %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf 'slurm.sh: error: %s\n' "$*" >&2; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  local nodes=${1:-1} i
  [[ "$nodes" =~ ^[0-9]+$ ]] && ((nodes >= 1 && nodes <= 8)) || die "N must be 1 to 8, not '$nodes'"
  [[ $(id -u) == 0 ]] || die "needs root (slurmd runs jobs as their users)"
  ((nodes == 1)) || [[ "$STATE" != /tmp/* ]] || die "$STATE: with N > 1 the state dir must not be under /tmp"
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
  local host cpus ctld_addr=127.0.0.1
  host=$(hostname -s)
  cpus=$(nproc)
  ((nodes == 1)) || { netns_up "$nodes"; ctld_addr=$NET.254; }
  cat >"$CONF" <<EOF
ClusterName=pyhpc-test
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
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
EOF
  if ((nodes == 1)); then
    echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN" >>"$CONF"
    echo "PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF"
  else
    for ((i = 1; i <= nodes; i++)); do
      echo "NodeName=node$i NodeAddr=$NET.$i CPUs=$cpus State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=test Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$CONF"
  fi
  export SLURM_CONF="$CONF"
  pid_alive "$STATE/run/slurmctld.pid" || { slurmctld -f "$CONF"; log "slurmctld started"; }
  if ((nodes == 1)); then
    mkdir -p "$STATE/spool/$host"
    pid_alive "$STATE/run/slurmd-$host.pid" || { slurmd -f "$CONF"; log "slurmd started"; }
  else
    for ((i = 1; i <= nodes; i++)); do
      mkdir -p "$STATE/spool/node$i"
      pid_alive "$STATE/run/slurmd-node$i.pid" && continue
      # /tmp as this machine has it, with the node's own writes over it (an overlay): what is
      # under /tmp (a checkout, a test's files) stays visible, what Slurm makes there is not shared.
      mkdir -p "$STATE/tmp/node$i/upper" "$STATE/tmp/node$i/work"
      nsenter --net="/run/netns/pyhpc-slurm-$i" unshare -m --propagation private sh -c \
        "mount -t overlay overlay -o lowerdir=/tmp,upperdir='$STATE/tmp/node$i/upper',workdir='$STATE/tmp/node$i/work' /tmp && exec slurmd -f '$CONF' -N node$i"
      log "slurmd node$i started ($NET.$i)"
    done
  fi
  for _ in $(seq 1 60); do
    if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)') -ge $nodes ]]; then
      log "ready: $(sinfo -h -o '%N %T %c')"
      return 0
    fi
    sleep 0.5
  done
  die "the node did not come up: $(sinfo 2>&1 | tail -2); see $STATE/log"
}

netns_up() { "$here/netns.sh" up pyhpc-slurm slurm "$NET" "$1" slurmhost; }
netns_down() { "$here/netns.sh" down pyhpc-slurm slurmhost; }

down() {
  local f
  for f in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid" "$STATE/run/munged.pid"; do
    if pid_alive "$f"; then
      kill "$(cat "$f")" 2>/dev/null || true
    fi
  done
  sleep 1
  netns_down
  log "stopped"
}

case "${1:-}" in
  up) shift; up "${1:-1}" ;;
  down) down ;;
  env) echo "SLURM_CONF=$CONF" ;;
  *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
