#!/usr/bin/env bash
# More Nomad client nodes for multi-node MPI, each in its own network namespace, joined to the
# running test bed's "global" region (scripts/testbed/cluster.sh up first).
#
#   scripts/testbed/mpi-nodes.sh up [N]    N client nodes (default 2), node pool "mpi"
#   scripts/testbed/mpi-nodes.sh down      stop them, remove the namespaces
#   scripts/testbed/mpi-nodes.sh status
#
# Node i runs in network namespace pyhpc-mpi-i with address 10.99.0.i/24 on a veth whose
# other end sits on a bridge in namespace pyhpc-mpi-sw: the nodes reach each other, and
# nothing of this is on the host's own interfaces. The server's RPC port (127.0.0.1:4647 of
# the host) is carried into every namespace's 127.0.0.1 by nsbridge.py, and so is, as port
# 8500, the HTTP port of the node's own Consul client agent (mpi-i, 127.0.0.1:8520+i, serf
# 8320+i, joined to the test bed's Consul: one agent per Nomad client, see cluster.sh). The
# nodes are in node pool "mpi", so jobs of the default pool never land there; each has its own data_dir,
# cgroup parent and pyhpc run_dir, and shares the host's plugin_dir, image store and images.
# The agents enter their namespace with nsenter --net, not `ip netns exec`, which would also
# mount a fresh /sys and so hide /sys/fs/cgroup from them and their tasks.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
STATE="${PYHPC_CLUSTER_DIR:-/tmp/pyhpc-cluster}"
M="$STATE/mpi-nodes"
NET=10.99.0
eval "$("$here/cluster.sh" env)"
NOMAD_BIN=$(command -v nomad)
consul_http() { echo $((8520 + $1)); }   # node I's Consul client agent
consul_serf() { echo $((8320 + $1)); }

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf 'mpi-nodes.sh: error: %s\n' "$*" >&2; exit 1; }

count() { [[ -f "$M/count" ]] && cat "$M/count" || echo 0; }

netns_up() { "$here/netns.sh" up pyhpc-mpi mpi "$NET" "$1"; }
netns_down() { "$here/netns.sh" down pyhpc-mpi; }

node_config() {   # node_config I -> agent HCL for node I
  local i=$1 cgroup
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then cgroup="nomad-mpi-$i.slice"; else cgroup="/nomad-mpi-$i"; fi
  cat <<EOF
name       = "mpi-$i"
region     = "global"
datacenter = "dc1"
data_dir   = "$M/node$i/data"
plugin_dir = "$STATE/plugins"
bind_addr  = "127.0.0.1"
log_level  = "DEBUG"
disable_update_check = true

advertise {
  http = "$NET.$i"
  rpc  = "$NET.$i"
  serf = "$NET.$i"
}

client {
  enabled           = true
  servers           = ["127.0.0.1:4647"]
  node_pool         = "mpi"
  network_interface = "mpi$i"
  cgroup_parent     = "$cgroup"
  options {
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}

consul {
  address          = "127.0.0.1:8500"
  client_auto_join = false
  auto_advertise   = false
}
EOF
}

cmd_up() {
  local n=${1:-2} i pid
  [[ -n "$NOMAD_BIN" ]] || die "no nomad binary (build the test bed first)"
  [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 16)) || die "N must be 1 to 16, not '$n'"
  curl -sf "$NOMAD_ADDR/v1/agent/self" >/dev/null || die "the test bed is not up ($NOMAD_ADDR)"
  [[ "$(count)" == 0 ]] || die "MPI nodes already up ($(count)); run '$0 down' first"
  netns_down
  mkdir -p "$M"
  netns_up "$n"
  echo "$n" >"$M/count"
  for ((i = 1; i <= n; i++)); do
    mkdir -p "$M/node$i/data"
    "$here/cluster.sh" consul-client "mpi-$i" "$(consul_http "$i")" "$(consul_serf "$i")"
    (cd "$M/node$i" && exec setsid python3 "$here/nsbridge.py" "4647,8500:$(consul_http "$i")" \
        "pyhpc-mpi-$i" >"$M/node$i/bridge.log" 2>&1 &
     echo $! >"$M/node$i/bridge.pid")
    node_config "$i" >"$M/node$i/agent.hcl"
    # The pyhpc plugin config of the host's client, with this node's own run_dir.
    sed -e "s|^    run_dir = .*|    run_dir = \"/run/pyhpc-mpi-$i\"|" "$STATE/nomad/pyhpc.hcl" \
      >"$M/node$i/pyhpc.hcl"
    (cd "$M/node$i" && exec setsid nsenter --net="/run/netns/pyhpc-mpi-$i" "$NOMAD_BIN" agent \
        -config "$M/node$i/agent.hcl" -config "$M/node$i/pyhpc.hcl" >"$M/node$i/agent.log" 2>&1 &
     echo $! >"$M/node$i/pid")
  done
  local deadline=$((SECONDS + ${NOMAD_READY_TIMEOUT:-90})) ready
  while :; do
    ready=$("$NOMAD_BIN" node status -filter 'NodePool == "mpi"' -t \
      '{{range .}}{{if and (eq .Status "ready") (index .Drivers "pyhpc")}}{{if (index .Drivers "pyhpc").Healthy}}{{.Name}} {{end}}{{end}}{{end}}' 2>/dev/null || true)
    [[ $(wc -w <<<"$ready") -ge $n ]] && break
    ((SECONDS < deadline)) || { tail -n 20 "$M"/node*/agent.log >&2; die "only '$ready' ready after ${NOMAD_READY_TIMEOUT:-90} s"; }
    sleep 0.5
  done
  log "MPI nodes ready: $ready(node pool mpi, $NET.1-$n)"
}

cmd_down() {
  local i pid id
  # Their tasks outlive the agents by design: stop every allocation on them first.
  local -a ids=()
  read -r -a ids <<<"$("$NOMAD_BIN" node status -filter 'NodePool == "mpi" and Status == "ready"' \
    -t '{{range .}}{{.ID}} {{end}}' 2>/dev/null || true)"
  for id in "${ids[@]}"; do
    "$NOMAD_BIN" node drain -enable -force -detach -yes "$id" >/dev/null 2>&1 || true
  done
  for _ in $(seq 60); do
    pgrep -f "^/bin/sh /usr/local/pyhpc/bin/" >/dev/null || break
    sleep 0.5
  done
  for ((i = 1; i <= $(count); i++)); do
    pid=$(cat "$M/node$i/pid" 2>/dev/null || true)
    [[ -n "$pid" ]] && kill -INT "$pid" 2>/dev/null || true
  done
  for ((i = 1; i <= $(count); i++)); do
    pid=$(cat "$M/node$i/pid" 2>/dev/null || true)
    for _ in $(seq 100); do [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
  done
  for ((i = 1; i <= $(count); i++)); do
    pid=$(cat "$M/node$i/bridge.pid" 2>/dev/null || true)
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    "$here/cluster.sh" consul-client "mpi-$i" stop >/dev/null || true
  done
  # The nodes' allocations and plugins outlive their agents; cluster.sh down ends them too.
  pkill -f "$M/" 2>/dev/null || true
  netns_down
  for ((i = 1; i <= 16; i++)); do rm -rf "/run/pyhpc-mpi-$i"; done
  if [[ -d "$M" ]]; then
    { grep -o " $M/[^ ]*" /proc/mounts || true; } | sort -r | while read -r mnt; do umount -l "$mnt" || true; done
    rm -rf --one-file-system "$M"
  fi
  # Their nodes stay known to the server as down; purge them so node lists stay short.
  for id in $("$NOMAD_BIN" node status -filter 'NodePool == "mpi"' -t '{{range .}}{{.ID}} {{end}}' 2>/dev/null); do
    curl -sf -X POST "$NOMAD_ADDR/v1/node/$id/purge" >/dev/null || true
  done
  log "MPI nodes down"
}

cmd_status() {
  "$NOMAD_BIN" node status -filter 'NodePool == "mpi"' || true
  ip netns list | grep pyhpc-mpi || true
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
