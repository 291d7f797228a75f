#!/usr/bin/env bash
# A one-machine Nomad + Consul + Vault cluster on loopback, for the demo and the
# end-to-end tests.
#
#   scripts/testbed/cluster.sh up                    start Consul, Vault, Nomad (waits until the node is ready)
#   scripts/testbed/cluster.sh down                  stop everything, unmount, remove the state dir
#   scripts/testbed/cluster.sh status                what runs, and whether it answers
#   scripts/testbed/cluster.sh restart-nomad [--kill]  restart the Nomad agent on the same data_dir
#                                                    (SIGINT, graceful; --kill: SIGKILL the agent only)
#   scripts/testbed/cluster.sh stop-region REGION    stop that region's Nomad agent (keeps its data_dir)
#   scripts/testbed/cluster.sh start-region REGION   start it again
#   scripts/testbed/cluster.sh stop-service NAME     stop consul, vault or registry ('up' starts it again;
#                                                    Consul and Vault come back empty: dev mode)
#   scripts/testbed/cluster.sh consul-client NAME HTTP_PORT SERF_PORT | consul-client NAME stop
#                                                    a Consul client agent for one more Nomad client
#   scripts/testbed/cluster.sh env                   export lines for NOMAD_ADDR & co (eval "$(... env)")
#
# Layout (state dir ${PYHPC_CLUSTER_DIR:-/tmp/pyhpc-cluster}):
#   logs/{consul,vault,nomad,nomad-east}.log   agent logs (Nomad's are appended across restarts)
#   pids/{consul,vault,nomad,nomad-east}.pid   agent pids (consul-NAME: Consul client agents)
#   nomad/data/, nomad-east/data/   Nomad data_dirs (raft, client state, alloc dirs)
#   nomad/agent.hcl, nomad-east/agent.hcl   generated agent configs
#   plugins/                        Nomad plugin_dir (the pyhpc driver is installed here)
#
# Consul and Vault run in -dev mode (in memory). Nomad is NOT in -dev mode: it keeps
# its state in data_dir so an agent restart (graceful or SIGKILL) recovers running
# tasks, which is what the restart tests exercise.
#
# Two federated Nomad regions, each one agent (server + client): "global" (datacenter dc1,
# the one NOMAD_ADDR points at) and "east" (datacenter dc2), joined over serf like two
# sites. Both clients use this machine; east's cgroups live under their own parent.
#
# Every Nomad client has a Consul agent of its own, as in production: a Nomad client removes
# from its Consul agent every Nomad service it did not register itself (a minute after it
# starts), so two clients sharing one agent delete each other's services. Global's is the
# dev server; east's is a client agent "pyhpc-east" (http 8510, serf 8311), as are those of
# mpi-nodes.sh's nodes.
#
# Everything listens on 127.0.0.1 only:
#   Nomad global 4646 (http) 4647 (rpc) 4648 (serf), east 4746/4747/4748; Consul 8500 (http) 8502 (grpc) 8600 (dns)
#   8300-8302 (server/serf), east's Consul client 8510 (http) 8311 (serf); Vault 8200 (api) 8201 (cluster).
#
# Environment:
#   PYHPC_CLUSTER_DIR    state dir (default /tmp/pyhpc-cluster)
#   PYHPC_TESTBED_CACHE  where build.sh put the binaries (default ~/.cache/pyhpc/testbed)
#   PYHPC_NO_PLUGIN=1    do not install the pyhpc plugin nor load plugin-config/pyhpc.hcl
#   PYHPC_REGIONS=1      start region "global" only (default 2: global and east)
#   PYHPC_PYTHON         interpreter used to install the plugin (default python3)
#   NOMAD_READY_TIMEOUT  seconds to wait for the Nomad node (default 90)

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(cd "$here/../.." && pwd -P)"
cd /    # nothing this script spawns should hold a directory (e.g. the state dir) busy
cache_root="${PYHPC_TESTBED_CACHE:-$HOME/.cache/pyhpc/testbed}"

STATE="${PYHPC_CLUSTER_DIR:-/tmp/pyhpc-cluster}"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
PLUGIN_DIR="$STATE/plugins"
PYHPC_HCL="$repo/plugin-config/pyhpc.hcl"
# Where the test bed's plugin runs its tasks (run_dir/tasks, from its config).
TASKS_DIR="$(awk -F'"' '$1 ~ /^ *run_dir *= *$/ { print $2; exit }' "$PYHPC_HCL")/tasks"

NOMAD_ADDR_LOCAL="http://127.0.0.1:4646"
CONSUL_ADDR_LOCAL="127.0.0.1:8500"
VAULT_ADDR_LOCAL="http://127.0.0.1:8200"
VAULT_TOKEN_LOCAL="root"
READY_TIMEOUT="${NOMAD_READY_TIMEOUT:-90}"

# Our own processes must not talk to anything but this cluster.
export CHECKPOINT_DISABLE=1
export NOMAD_ADDR="$NOMAD_ADDR_LOCAL" CONSUL_HTTP_ADDR="$CONSUL_ADDR_LOCAL"
export VAULT_ADDR="$VAULT_ADDR_LOCAL" VAULT_TOKEN="$VAULT_TOKEN_LOCAL"
unset NOMAD_TOKEN CONSUL_HTTP_TOKEN NOMAD_REGION NOMAD_NAMESPACE

log()  { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf 'cluster.sh: error: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------------------
# Binaries: the same cache paths build.sh writes (version read from the wrapper go.mod).
# --------------------------------------------------------------------------------------
bin_path() {   # bin_path PRODUCT -> path of the cached binary
  local p="$1" v
  v=$(awk -v m="github.com/hashicorp/$p" '$1 == m && $2 ~ /^v/ { sub(/^v/, "", $2); print $2; exit }' \
        "$here/$p/go.mod")
  [[ -n "$v" ]] || die "cannot read the $p version from $here/$p/go.mod"
  printf '%s/%s-%s/%s\n' "$cache_root" "$p" "$v" "$p"
}
NOMAD_BIN=$(bin_path nomad)
CONSUL_BIN=$(bin_path consul)
VAULT_BIN=$(bin_path vault)
REGISTRY_BIN=/usr/bin/docker-registry   # Debian's docker-registry (the CNCF distribution)
REGISTRY_ADDR_LOCAL="127.0.0.1:5000"
# A registry that needs a login: the e2e tests start it (htpasswd) and write the logins the
# test bed's credential helper (docker-credential-pyhpc-testbed, in $STATE/bin on the agent's
# PATH) answers with into $STATE/registry-logins.json.
PRIVATE_REGISTRY_LOCAL="127.0.0.1:5001"

require_binaries() {
  local missing=() b
  for b in "$NOMAD_BIN" "$CONSUL_BIN" "$VAULT_BIN"; do
    [[ -x "$b" ]] || missing+=("$b")
  done
  if ((${#missing[@]})); then
    printf 'cluster.sh: test-bed binaries missing:\n' >&2
    printf '  %s\n' "${missing[@]}" >&2
    printf 'build them first (several minutes per product on 2 cores):\n  %s/build.sh all\n' \
      "$here" >&2
    exit 1
  fi
}

# --------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------
# pid_of NAME -> the recorded pid if that process is alive and still runs our binary
# (a stale pid file must never make us signal an unrelated process).
pid_of() {
  local f="$PIDS/$1.pid" pid exe want
  [[ -f "$f" ]] || return 0
  pid=$(<"$f")
  [[ -n "$pid" ]] && alive "$pid" || return 0
  case "$1" in
    nomad|nomad-east) want="$NOMAD_BIN" ;; consul|consul-*) want="$CONSUL_BIN" ;; vault) want="$VAULT_BIN" ;;
    registry) want="$REGISTRY_BIN" ;;
  esac
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
  # "(deleted)" when build.sh replaced the binary while it was running.
  if [[ "$exe" == "$want" || "$exe" == "$want (deleted)" ]]; then printf '%s\n' "$pid"; fi
}

alive() {      # alive PID -> true if the process exists and is not a zombie
  local st
  st=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n "$st" && "$st" != Z ]]
}

http_get() {   # http_get URL: body on stdout; loopback only, so never through a proxy
  curl -sf -m 5 --noproxy '*' "$1" 2>/dev/null
}

is_listening() {   # is_listening PORT -> true if something listens on that TCP port
  [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
}

wait_gone() {   # wait_gone PID SECONDS -> true once the pid is gone
  local pid="$1" n=$(($2 * 10))
  while ((n-- > 0)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  ! alive "$pid"
}

log_tail() {   # log_tail NAME [LINES]: print the end of an agent log to stderr
  local f="$LOGS/$1.log"
  [[ -f "$f" ]] || return 0
  printf -- '---- last %s lines of %s ----\n' "${2:-40}" "$f" >&2
  tail -n "${2:-40}" "$f" >&2
  printf -- '----\n' >&2
}

# start_daemon NAME CMD...: run CMD in its own session (so a Ctrl-C in the calling
# terminal or the end of a pytest run does not reach it), cwd = state dir, output
# appended to logs/NAME.log, pid recorded in pids/NAME.pid.
start_daemon() {
  local name="$1"; shift
  (
    cd "$STATE"
    exec setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1
  ) &
  local pid=$! n=50
  echo "$pid" >"$PIDS/$name.pid"
  # The subshell becomes the agent after two execs (setsid, then the binary).
  while ((n-- > 0)) && [[ -z "$(pid_of "$name")" ]]; do
    alive "$pid" || break
    sleep 0.1
  done
}

# stop_daemon NAME SIGNAL GRACE: send SIGNAL, wait GRACE seconds, then SIGKILL.
stop_daemon() {
  local name="$1" sig="$2" grace="$3" pid
  pid=$(pid_of "$name")
  if [[ -z "$pid" ]]; then rm -f "$PIDS/$name.pid"; return 0; fi
  log "$name: stopping (pid $pid, SIG$sig)"
  kill -s "$sig" "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" "$grace"; then
    warn "$name did not exit within ${grace}s; sending SIGKILL"
    kill -s KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "$name (pid $pid) survives SIGKILL"
  fi
  rm -f "$PIDS/$name.pid"
}

# --------------------------------------------------------------------------------------
# Consul and Vault (dev mode, in memory)
# --------------------------------------------------------------------------------------
consul_ready() { "$CONSUL_BIN" members >/dev/null 2>&1 && [[ -n "$(consul_leader)" ]]; }
consul_leader() { http_get "http://$CONSUL_ADDR_LOCAL/v1/status/leader" | tr -d '"'; }
vault_ready()  { "$VAULT_BIN" status >/dev/null 2>&1; }

wait_for() {   # wait_for NAME SECONDS CHECK-FUNCTION
  local name="$1" secs="$2" check="$3" n
  n=$((secs * 4))
  while ((n-- > 0)); do
    if "$check"; then return 0; fi
    [[ -n "$(pid_of "$name")" ]] || { log_tail "$name"; die "$name exited during startup"; }
    sleep 0.25
  done
  log_tail "$name"
  die "$name not ready after ${secs}s"
}

start_consul() {
  if [[ -n "$(pid_of consul)" ]]; then log "consul: already running"; return 0; fi
  log "consul: starting (dev mode, 127.0.0.1:8500)"
  start_daemon consul "$CONSUL_BIN" agent -dev \
    -node=pyhpc-dev -bind=127.0.0.1 -client=127.0.0.1 -advertise=127.0.0.1 \
    -log-level=info
  wait_for consul 30 consul_ready
  log "consul: ready (leader $(consul_leader))"
}

# start_consul_client NAME HTTP_PORT SERF_PORT: a Consul client agent on 127.0.0.1, joined
# to the dev server's LAN pool (pids/consul-NAME.pid, logs/consul-NAME.log).
start_consul_client() {
  local name="consul-$1" http="$2" serf="$3"
  if [[ -n "$(pid_of "$name")" ]]; then log "$name: already running"; return 0; fi
  [[ -n "$(pid_of consul)" ]] || die "consul is not running (run '$0 up' first)"
  log "$name: starting (client agent, 127.0.0.1:$http)"
  mkdir -p "$STATE/$name"
  start_daemon "$name" "$CONSUL_BIN" agent -node="$1" -data-dir="$STATE/$name" \
    -bind=127.0.0.1 -client=127.0.0.1 -advertise=127.0.0.1 -serf-lan-port="$serf" \
    -http-port="$http" -dns-port=-1 -grpc-port=-1 -retry-join=127.0.0.1:8301 -log-level=info
  CLIENT_HTTP=$http wait_for "$name" 30 consul_client_ready
  log "$name: joined"
}
# The client answers with the server's leader once it has joined.
consul_client_ready() { [[ -n "$(http_get "http://127.0.0.1:$CLIENT_HTTP/v1/status/leader" | tr -d '"')" ]]; }

consul_clients() { local f; for f in "$PIDS"/consul-*.pid; do [[ -e "$f" ]] && basename "$f" .pid; done; }

start_vault() {
  if [[ -n "$(pid_of vault)" ]]; then log "vault: already running"; return 0; fi
  log "vault: starting (dev mode, 127.0.0.1:8200, root token 'root')"
  # -dev-no-store-token: do not write ~/.vault-token.
  start_daemon vault "$VAULT_BIN" server -dev -dev-root-token-id="$VAULT_TOKEN_LOCAL" \
    -dev-listen-address=127.0.0.1:8200 -dev-no-store-token
  wait_for vault 30 vault_ready
  log "vault: ready (unsealed)"
}

registry_ready() { http_get "http://$REGISTRY_ADDR_LOCAL/v2/" >/dev/null; }

start_registry() {
  if [[ -n "$(pid_of registry)" ]]; then log "registry: already running"; return 0; fi
  [[ -x "$REGISTRY_BIN" ]] || die "missing $REGISTRY_BIN (apt-get install docker-registry)"
  log "registry: starting (OCI distribution, $REGISTRY_ADDR_LOCAL, storage in $STATE/registry)"
  mkdir -p "$STATE/registry"
  printf '%s\n' "version: 0.1" "log: {level: warn}" \
    "storage: {filesystem: {rootdirectory: $STATE/registry/data}, delete: {enabled: true}}" \
    "http: {addr: $REGISTRY_ADDR_LOCAL}" >"$STATE/registry/config.yml"
  start_daemon registry "$REGISTRY_BIN" serve "$STATE/registry/config.yml"
  wait_for registry 30 registry_ready
  log "registry: ready"
}

# --------------------------------------------------------------------------------------
# Nomad: one agent (server + client, persistent data_dir) per region
# --------------------------------------------------------------------------------------
REGIONS=(global)
[[ "${PYHPC_REGIONS:-2}" == 1 ]] || REGIONS+=(east)

# agent REGION: set the A_* variables describing that region's agent.
agent() {
  A_REGION="$1"
  case "$1" in
    global) A_NAME=nomad;      A_DC=dc1; A_PORT=4646; A_CGROUP=nomad;      A_CONSUL_PORTS=() ;;
    east)   A_NAME=nomad-east; A_DC=dc2; A_PORT=4746; A_CGROUP=nomad-east; A_CONSUL_PORTS=(8510 8311) ;;
    *) die "unknown region '$1' (the test bed has: global east)" ;;
  esac
  A_DATA="$STATE/$A_NAME/data"
  A_HCL="$STATE/$A_NAME/agent.hcl"
  A_CONFIGS="$STATE/$A_NAME/config-files"   # the -config files 'up' chose, for restarts
  A_ADDR="http://127.0.0.1:$A_PORT"
  # The region's Consul agent (see top): the dev server, or a client agent on A_CONSUL_PORTS
  # (http, serf).
  A_CONSUL=$CONSUL_ADDR_LOCAL
  ((${#A_CONSUL_PORTS[@]} == 0)) || A_CONSUL=127.0.0.1:${A_CONSUL_PORTS[0]}
  # Nomad's own default parent for each cgroup version, and a sibling for east (a v2 name on
  # v1 leaves the client without reservable cores).
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then A_CGROUP="$A_CGROUP.slice"; else A_CGROUP="/$A_CGROUP"; fi
}

write_nomad_config() {   # for the region set by `agent`
  local join=""
  # Every other region's server joins global's serf (WAN): that is the federation.
  [[ "$A_REGION" == global ]] || join='
  server_join {
    retry_join = ["127.0.0.1:4648"]
  }'
  mkdir -p "$A_DATA"
  cat >"$A_HCL" <<EOF
# Generated by scripts/testbed/cluster.sh - edits are overwritten by 'up'.
name       = "pyhpc-$A_REGION"
region     = "$A_REGION"
datacenter = "$A_DC"
data_dir   = "$A_DATA"
plugin_dir = "$PLUGIN_DIR"
bind_addr  = "127.0.0.1"
log_level  = "DEBUG"
disable_update_check = true

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

ports {
  http = $A_PORT
  rpc  = $((A_PORT + 1))
  serf = $((A_PORT + 2))
}

server {
  enabled          = true
  bootstrap_expect = 1$join
}

client {
  enabled           = true
  network_interface = "lo"
  cgroup_parent     = "$A_CGROUP"
  options {
    # These fingerprinters probe cloud metadata at 169.254.169.254: never here.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}

plugin "raw_exec" {
  config {
    enabled = true
  }
}

consul {
  address = "$A_CONSUL"
}

vault {
  enabled = true
  address = "$VAULT_ADDR_LOCAL"
  token   = "$VAULT_TOKEN_LOCAL"
}
EOF
}

# Node ID and status of the region's client, as "ID STATUS" ("" if the agent is not up).
nomad_node_line() {
  { "$NOMAD_BIN" node status -address="$A_ADDR" 2>/dev/null || true; } \
    | awk 'NR == 2 { print $1, $NF }'
}

# wait_nomad_ready LOG-OFFSET: wait until the client registered *in this run of the
# agent* (log line after LOG-OFFSET) and the server reports the node ready. Checking
# the log matters after a restart: the server's restored state says "ready" before
# the restarted client has re-registered.
wait_nomad_ready() {
  local off="$1" deadline=$(($(date +%s) + READY_TIMEOUT)) line log="$LOGS/$A_NAME.log"
  while (($(date +%s) < deadline)); do
    if [[ -z "$(pid_of "$A_NAME")" ]]; then
      log_tail "$A_NAME" 60
      die "$A_NAME agent exited during startup (see $log)"
    fi
    # (grep reads a process substitution: with pipefail, `tail | grep -q` can fail on SIGPIPE)
    if grep -q 'client: node registration complete' <(tail -c +"$((off + 1))" "$log"); then
      line=$(nomad_node_line)
      if [[ "$line" == *" ready" ]]; then
        log "$A_NAME: node ${line%% *} ready (region $A_REGION)"
        return 0
      fi
    fi
    sleep 0.5
  done
  log_tail "$A_NAME" 60
  die "$A_NAME node not ready after ${READY_TIMEOUT}s (see $log)"
}

# wait_federated: global's server sees every region (bounded; serf gossip).
wait_federated() {
  ((${#REGIONS[@]} > 1)) || return 0
  local n=120 seen=""
  while ((n-- > 0)); do
    seen=$(http_get "$NOMAD_ADDR_LOCAL/v1/regions" | tr -d '[]" ' || true)
    if [[ "$seen" == "east,global" ]]; then log "nomad: regions federated: $seen"; return 0; fi
    sleep 0.5
  done
  die "regions not federated after 60s (global sees '${seen:-nothing}')"
}

# If the pyhpc plugin is installed, report whether Nomad detected the driver (warning
# only: a broken driver should not stop the cluster from coming up for debugging).
report_pyhpc_driver() {
  [[ -x "$PLUGIN_DIR/pyhpc" ]] || return 0   # not installed (PYHPC_NO_PLUGIN=1)
  local n=40 detected=""
  while ((n-- > 0)); do
    detected=$(http_get "$A_ADDR/v1/nodes?resources=false" \
      | python3 -c 'import json,sys
nodes = json.load(sys.stdin)
d = (nodes[0].get("Drivers") or {}).get("pyhpc") if nodes else None
print("%s %s %s" % (d["Detected"], d["Healthy"], d["HealthDescription"]) if d else "")' 2>/dev/null || true)
    [[ "$detected" == True\ True* ]] && { log "$A_NAME: pyhpc driver detected and healthy"; return 0; }
    sleep 0.5
  done
  warn "$A_NAME: pyhpc driver not detected/healthy after 20s (${detected:-no fingerprint}); see $LOGS/$A_NAME.log"
}

install_plugin() {
  mkdir -p "$PLUGIN_DIR"
  if [[ "${PYHPC_NO_PLUGIN:-0}" == 1 ]]; then
    log "nomad: PYHPC_NO_PLUGIN=1: not installing the pyhpc plugin"
    return 0
  fi
  log "nomad: installing the pyhpc plugin into $PLUGIN_DIR"
  (cd "$repo" && "${PYHPC_PYTHON:-python3}" -m nomad_driver.cli.main install-plugin \
      --plugin-dir "$PLUGIN_DIR") || die "plugin install failed"
  [[ -x "$PLUGIN_DIR/pyhpc" ]] || die "install-plugin did not create $PLUGIN_DIR/pyhpc"
  (cd "$repo" && "${PYHPC_PYTHON:-python3}" -m nomad_driver.cli.main install-plugin --gpu \
      --plugin-dir "$PLUGIN_DIR") || die "GPU plugin install failed"
}

# write_pyhpc_config: the documented plugin config plus the test bed's registry as an
# allowed image source, signatures enforced for .../signed/ and warned for .../warned/,
# key pyhpc-images in the dev Vault (the test bed's root token, in a root-only file).
# Every region's client loads the same file.
write_pyhpc_config() {
  [[ "${PYHPC_NO_PLUGIN:-0}" != 1 ]] || return 0
  [[ -f "$PYHPC_HCL" ]] || die "missing $PYHPC_HCL (plugin \"pyhpc\" { config { ... } })"
  grep -q '^    image_sources = \[\]$' "$PYHPC_HCL" || die "$PYHPC_HCL lacks 'image_sources = []'"
  ( umask 077; printf '%s\n' "$VAULT_TOKEN_LOCAL" >"$STATE/vault-token" )
  local r="$REGISTRY_ADDR_LOCAL"
  mkdir -p "$STATE/nomad"
  # A shared scratch directory jobs may bind from (the tenant attack tests race in it).
  install -d -m 0755 "$STATE/scratch"
  sed -e 's|^    mount_dirs = \[\]$|    mount_dirs = ["'"$STATE"'/scratch"]|' \
      -e 's|^    image_sources = \[\]$|    image_sources = ["docker://'"$r"'/", "oras://'"$r"'/", "docker://'"$PRIVATE_REGISTRY_LOCAL"'/"]\
    auth {\
      helper       = "pyhpc-testbed"\
      task_helpers = ["pyhpc-testbed"]\
    }|' \
      -e 's|^    signature_rules = \[\]$|    signature_rules = ["docker://'"$r"'/signed/=enforce", "docker://'"$r"'/warned/=warn", "docker://'"$r"'/cosigned/=cosign"]|' \
      -e 's|^    # cosign_keys   = \[\]$|    cosign_keys   = ["'"$STATE"'/cosign/cosign.pub", "hashivault://pyhpc-cosign"]|' \
      -e 's|^    # image_gc_interval = "1h"$|    image_gc_interval = "10s"|' \
      -e 's|^    # image_mount_linger = "2m"$|    image_mount_linger = "0"|' \
      -e 's|^    # default_env     = \[\]$|    default_env     = ["PYHPC_SITE=testbed"]|' \
      -e 's|^    # hooks_dir    = ""$|    hooks_dir    = "'"$STATE"'/hooks"|' \
      -e 's|^    signature_keys  = \[\]$|    signature_keys  = ["pyhpc-images"]|' \
      -e 's|^    vault_address   = ""$|    vault_address   = "'"$VAULT_ADDR_LOCAL"'"|' \
      -e 's|^    vault_token_file = ""$|    vault_token_file = "'"$STATE/vault-token"'"|' \
    "$PYHPC_HCL" >"$STATE/nomad/pyhpc.hcl"
  grep -q 'signed/=enforce' "$STATE/nomad/pyhpc.hcl" || die "could not add the signature rules"
  grep -q '^    cosign_keys   = \["' "$STATE/nomad/pyhpc.hcl" || die "could not add cosign_keys"
  grep -q 'helper       = "pyhpc-testbed"' "$STATE/nomad/pyhpc.hcl" || die "could not add auth"
  grep -q '^    image_gc_interval = "10s"' "$STATE/nomad/pyhpc.hcl" || die "could not set image_gc_interval"
  # Every mount gone when its last task ends: the leak checks count mounts node-wide.
  grep -q '^    image_mount_linger = "0"' "$STATE/nomad/pyhpc.hcl" || die "could not set image_mount_linger"
  grep -q '^    default_env     = \["PYHPC_SITE' "$STATE/nomad/pyhpc.hcl" || die "could not set default_env"
  grep -q '^    hooks_dir    = "/' "$STATE/nomad/pyhpc.hcl" || die "could not set hooks_dir"
  write_test_hooks
  write_credential_helper
  grep -q "mount_dirs = \[\"$STATE/scratch\"\]" "$STATE/nomad/pyhpc.hcl" || die "could not add mount_dirs"
}

# write_test_hooks: the test bed's site hook, which a task steers with PYHPC_TEST_HOOK in its
# env: "mount" binds $STATE/hooked at /hooked, "fail" fails the start; otherwise it says nothing.
write_test_hooks() {
  install -d -m 0755 "$STATE/hooks" "$STATE/hooked"
  printf 'bound by the test bed hook\n' >"$STATE/hooked/marker.txt"
  cat >"$STATE/hooks/10-testbed" <<EOF
#!/usr/bin/python3
import json, sys
wanted = json.load(sys.stdin)["env"].get("PYHPC_TEST_HOOK", "")
if wanted == "mount":
    print("mount $STATE/hooked:/hooked:ro")
elif wanted == "fail":
    sys.stderr.write("the test bed's hook refuses this task\n")
    sys.exit(3)
EOF
  chmod 0755 "$STATE/hooks/10-testbed"
}

# write_credential_helper: a Docker credential helper for the test bed: it answers `get`
# with the login $STATE/registry-logins.json has for the server ({"HOST": ["USER", "PASS"]}),
# and "credentials not found" otherwise (as Docker's own helpers do).
write_credential_helper() {
  mkdir -p "$STATE/bin"
  cat >"$STATE/bin/docker-credential-pyhpc-testbed" <<EOF
#!/usr/bin/python3
import json, sys
if sys.argv[1:] != ["get"]:
    sys.exit("usage: docker-credential-pyhpc-testbed get")
server = sys.stdin.read().strip()
try:
    with open("$STATE/registry-logins.json") as f:
        user, secret = json.load(f)[server]
except (OSError, ValueError, KeyError):
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({"ServerURL": server, "Username": user, "Secret": secret}))
EOF
  chmod 0755 "$STATE/bin/docker-credential-pyhpc-testbed"
}

# choose_nomad_configs: record which config files the region's agent loads (kept for
# restarts, so restart-nomad runs the agent exactly as 'up' did).
choose_nomad_configs() {
  printf '%s\n' "$A_HCL" >"$A_CONFIGS"
  if [[ "${PYHPC_NO_PLUGIN:-0}" != 1 ]]; then
    printf '%s\n' "$STATE/nomad/pyhpc.hcl" "$repo/plugin-config/pyhpc-gpu.hcl" >>"$A_CONFIGS"
  fi
}

start_nomad() {   # for the region set by `agent`
  if [[ -n "$(pid_of "$A_NAME")" ]]; then log "$A_NAME: already running"; return 0; fi
  [[ $(id -u) == 0 ]] || die "the Nomad client must run as root (it mounts alloc dirs)"
  [[ -f "$A_CONFIGS" ]] || die "no $A_CONFIGS (run '$0 up')"
  local -a cfg=() f
  while IFS= read -r f; do
    [[ -f "$f" ]] || die "nomad config file $f is missing"
    cfg+=(-config="$f")
  done <"$A_CONFIGS"
  local off=0
  [[ -f "$LOGS/$A_NAME.log" ]] && off=$(stat -c %s "$LOGS/$A_NAME.log")
  log "$A_NAME: starting agent (region $A_REGION, server+client, data_dir $A_DATA, ${cfg[*]})"
  PATH="$STATE/bin:$PATH" start_daemon "$A_NAME" "$NOMAD_BIN" agent "${cfg[@]}"
  wait_nomad_ready "$off"
}

# --------------------------------------------------------------------------------------
# Teardown helpers
# --------------------------------------------------------------------------------------

# Every process that belongs to this cluster: agents, Nomad executors/logmon, plugin
# processes and task processes. They are found by their working directory, executable
# or command line pointing into the state dir (all agents start with cwd = state dir,
# tasks run in alloc dirs under it), plus all their descendants.
cluster_pids() {
  local pid cwd exe cmd d
  local -a seeds=()
  # Never this script, nor the shell (or pytest) that called it, even if one of them
  # sits in the state dir: exclude our ancestors.
  local -A mine=()
  pid=$BASHPID
  while [[ -n "$pid" && "$pid" != 0 ]]; do
    mine[$pid]=1
    pid=$(awk '{ sub(/^.*\) /, ""); print $2 }' "/proc/$pid/stat" 2>/dev/null) || break
  done
  mine[$$]=1
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [[ -n "${mine[$pid]:-}" ]] && continue
    cwd=$(readlink "$d/cwd" 2>/dev/null) || continue
    exe=$(readlink "$d/exe" 2>/dev/null) || exe=""
    cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null) || cmd=""
    # Task supervisors work in the plugin's run_dir: found there, with their tasks, even
    # when the agent went before it could stop them (they outlive it by design).
    if [[ "$cwd" == "$STATE" || "$cwd" == "$STATE"/* || "$exe" == "$STATE"/* \
          || "$cmd" == *"$STATE"* || "$cwd" == "$TASKS_DIR"/* ]]; then
      seeds+=("$pid")
    fi
  done
  ((${#seeds[@]})) || return 0
  # Close over descendants (ps gives pid/ppid for everything at once).
  ps -eo pid=,ppid= | awk -v seeds="${seeds[*]}" -v mine="${!mine[*]}" '
    BEGIN {
      n = split(seeds, s, " "); for (i = 1; i <= n; i++) keep[s[i]] = 1
      n = split(mine, m, " ");  for (i = 1; i <= n; i++) skip[m[i]] = 1
    }
    { parent[$1] = $2 }
    END {
      do {
        changed = 0
        for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
      } while (changed)
      for (p in keep) if (!(p in skip) && (p in parent)) print p
    }'
}

kill_leftovers() {
  local -a pids
  mapfile -t pids < <(cluster_pids)
  ((${#pids[@]})) || return 0
  log "killing ${#pids[@]} leftover process(es): $(ps -o pid=,comm= -p "$(IFS=,; echo "${pids[*]}")" | tr -s ' \n' ' ')"
  kill -s TERM "${pids[@]}" 2>/dev/null || true
  local p
  for p in "${pids[@]}"; do wait_gone "$p" 5 || kill -s KILL "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait_gone "$p" 5 || warn "process $p survives SIGKILL"; done
}

# Mount points under the state dir, deepest first (mountinfo escapes blanks as \040).
state_mounts() {
  awk -v st="$STATE" '{
      mp = $5; gsub(/\\040/, " ", mp)
      if (mp == st || index(mp, st "/") == 1) print length(mp) "\t" mp
    }' /proc/self/mountinfo | sort -rn | cut -f2- | uniq
}

unmount_all() {
  local mp tries=0
  while [[ -n "$(state_mounts)" ]]; do
    if ((tries++ >= 5)); then
      warn "still mounted under $STATE:"; state_mounts >&2
      return 1
    fi
    while IFS= read -r mp; do
      log "unmounting $mp"
      umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || warn "cannot unmount $mp"
    done < <(state_mounts)
  done
}

# Before the agent goes, ask Nomad to stop every job so tasks end through their
# drivers (their own cleanup runs). Bounded; whatever is left is killed afterwards.
stop_all_jobs() {   # for the region set by `agent`
  [[ -n "$(pid_of "$A_NAME")" ]] || return 0
  local jobs j
  jobs=$(http_get "$A_ADDR/v1/jobs" | python3 -c '
import json, sys
for j in json.load(sys.stdin):
    if j.get("Status") != "dead":
        print(j["ID"])' 2>/dev/null || true)
  [[ -n "$jobs" ]] || return 0
  log "$A_NAME: stopping jobs: ${jobs//$'\n'/ }"
  for j in $jobs; do
    timeout 30 "$NOMAD_BIN" job stop -address="$A_ADDR" -detach -yes "$j" >/dev/null 2>&1 || true
  done
  # Wait (max 30 s) until no allocation is pending/running on the client.
  local n=60 busy
  while ((n-- > 0)); do
    busy=$(http_get "$A_ADDR/v1/allocations" | python3 -c '
import json, sys
print(sum(a["ClientStatus"] in ("pending", "running") for a in json.load(sys.stdin)))' \
      2>/dev/null || echo 0)
    [[ "$busy" == 0 ]] && return 0
    sleep 0.5
  done
  warn "$A_NAME: allocations still running after 30s; they will be killed"
}

# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------
PORTS=(4646 4647 4648 4746 4747 4748 8200 8201 8300 8301 8302 8500 8502 8600 8510 8311 5000)

cmd_up() {
  require_binaries
  mkdir -p "$LOGS" "$PIDS" "$PLUGIN_DIR"
  # Refuse to start next to something else that holds our ports (ours may run already:
  # `up` is idempotent and only starts what is missing).
  local port owner region
  for port in "${PORTS[@]}"; do
    case $port in
      464?) owner=nomad ;;
      474?) owner=nomad-east ;;
      820?) owner=vault ;;
      5000) owner=registry ;;
      8510|8311) owner=consul-pyhpc-east ;;
      *) owner=consul ;;
    esac
    if is_listening "$port" && [[ -z "$(pid_of "$owner")" ]]; then
      die "port $port ($owner) is already in use by another process:" \
          "$(ss -Hltnp "sport = :$port" | head -n1)"
    fi
  done
  local t0; t0=$(date +%s)
  start_consul
  start_vault
  start_registry
  [[ -n "$(pid_of nomad)" ]] || { write_pyhpc_config; install_plugin; }
  for region in "${REGIONS[@]}"; do
    agent "$region"
    ((${#A_CONSUL_PORTS[@]} == 0)) || start_consul_client "pyhpc-$region" "${A_CONSUL_PORTS[@]}"
    if [[ -z "$(pid_of "$A_NAME")" ]]; then
      write_nomad_config
      choose_nomad_configs
    fi
    start_nomad
    report_pyhpc_driver
  done
  wait_federated
  log "cluster up in $(($(date +%s) - t0)) s (regions ${REGIONS[*]}; state: $STATE)"
  log "use it with: eval \"\$($0 env)\""
}

cmd_down() {
  local region
  # MPI nodes (mpi-nodes.sh) first, while the server that drains them is up.
  if [[ -d "$STATE/mpi-nodes" ]]; then "$here/mpi-nodes.sh" down || warn "mpi-nodes down failed"; fi
  for region in east global; do
    agent "$region"
    stop_all_jobs
    # SIGINT = graceful shutdown (the server does not leave; no matter).
    stop_daemon "$A_NAME" INT 30
  done
  stop_daemon vault INT 15
  local client
  # SIGINT: a client agent leaves the pool, so the server forgets its node and services.
  for client in $(consul_clients); do stop_daemon "$client" INT 15; done
  stop_daemon consul INT 15
  stop_daemon registry TERM 10
  # Executors, logmon, plugins and tasks outlive the agent by design: end them.
  kill_leftovers
  unmount_all || die "could not unmount everything under $STATE; not removing it"
  if [[ -d "$STATE" ]]; then
    rm -rf --one-file-system "$STATE" || die "could not remove $STATE"
  fi
  # Nothing of ours may listen any more.
  local port busy=()
  for port in "${PORTS[@]}"; do
    is_listening "$port" && busy+=("$port")
  done
  if ((${#busy[@]})); then
    warn "still listening on: ${busy[*]}"
    ss -Hltnp | grep -E ":($(IFS='|'; echo "${busy[*]}"))\b" >&2 || true
    exit 1
  fi
  log "cluster down (state dir removed)"
}

cmd_status() {
  local rc=0 name pid region
  for name in consul vault registry nomad nomad-east; do
    pid=$(pid_of "$name")
    if [[ -n "$pid" ]]; then
      printf '%-10s running  pid %-7s %s\n' "$name" "$pid" "$(readlink "/proc/$pid/exe")"
    else
      printf '%-10s stopped\n' "$name"; rc=1
    fi
  done
  [[ -n "$(pid_of consul)" ]] && { echo "--- consul members"; "$CONSUL_BIN" members 2>&1 || rc=1; }
  [[ -n "$(pid_of vault)" ]] && { echo "--- vault status"; "$VAULT_BIN" status 2>&1 || rc=1; }
  for region in "${REGIONS[@]}"; do
    agent "$region"
    [[ -n "$(pid_of "$A_NAME")" ]] || continue
    local a=-address="$A_ADDR"
    echo "--- region $region: nomad server members"; "$NOMAD_BIN" server members "$a" 2>&1 || rc=1
    echo "--- region $region: nomad node status";    "$NOMAD_BIN" node status "$a" 2>&1 || rc=1
    echo "--- region $region: nomad job status";     "$NOMAD_BIN" job status "$a" 2>&1 || true
  done
  echo "--- state: $STATE"
  return "$rc"
}

# wait_unbound: the region's listeners must be gone before a new agent binds them.
wait_unbound() {
  local n=100
  while ((n-- > 0)) && { is_listening "$A_PORT" || is_listening "$((A_PORT + 1))"; }; do
    sleep 0.1
  done
}

cmd_restart_nomad() {
  local kill=0
  case "${1:-}" in
    --kill) kill=1 ;;
    "") ;;
    *) die "usage: $0 restart-nomad [--kill]" ;;
  esac
  require_binaries
  agent global
  [[ -f "$A_HCL" ]] || die "no cluster in $STATE (run '$0 up' first)"
  if ((kill)); then
    # Crash simulation: only the agent dies; executors and tasks keep running.
    stop_daemon "$A_NAME" KILL 10
  else
    stop_daemon "$A_NAME" INT 30
  fi
  wait_unbound
  start_nomad
  report_pyhpc_driver
}

# stop-region / start-region: a site going away and coming back (its data_dir kept).
cmd_stop_region() {
  [[ -n "${1:-}" ]] || die "usage: $0 stop-region REGION"
  agent "$1"
  stop_daemon "$A_NAME" INT 30
  wait_unbound
}

cmd_start_region() {
  [[ -n "${1:-}" ]] || die "usage: $0 start-region REGION"
  require_binaries
  agent "$1"
  [[ -f "$A_HCL" ]] || die "region $1 was never started in $STATE (run '$0 up')"
  start_nomad
  report_pyhpc_driver
  wait_federated
}

cmd_stop_service() {
  case "${1:-}" in
    consul|vault) stop_daemon "$1" INT 15 ;;
    registry) stop_daemon registry TERM 10 ;;
    *) die "usage: $0 stop-service consul|vault|registry" ;;
  esac
}

cmd_consul_client() {
  case "$#:${2:-}" in
    2:stop) stop_daemon "consul-$1" INT 15 ;;
    3:[0-9]*) require_binaries; start_consul_client "$@" ;;
    *) die "usage: $0 consul-client NAME HTTP_PORT SERF_PORT | consul-client NAME stop" ;;
  esac
}

cmd_env() {
  cat <<EOF
export NOMAD_ADDR=$NOMAD_ADDR_LOCAL
export CONSUL_HTTP_ADDR=$CONSUL_ADDR_LOCAL
export VAULT_ADDR=$VAULT_ADDR_LOCAL
export VAULT_TOKEN=$VAULT_TOKEN_LOCAL
export PATH=$(dirname "$NOMAD_BIN"):$(dirname "$CONSUL_BIN"):$(dirname "$VAULT_BIN"):\$PATH
EOF
}

usage() { sed -n '2,16p' "$here/cluster.sh" | sed 's/^# \{0,1\}//'; exit 2; }

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  restart-nomad) shift; cmd_restart_nomad "$@" ;;
  stop-region) shift; cmd_stop_region "$@" ;;
  start-region) shift; cmd_start_region "$@" ;;
  stop-service) shift; cmd_stop_service "$@" ;;
  consul-client) shift; cmd_consul_client "$@" ;;
  env) cmd_env ;;
  *) usage ;;
esac
