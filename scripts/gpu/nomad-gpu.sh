#!/usr/bin/env bash
# The GPU job through the real Nomad, on a machine with an NVIDIA GPU: one -dev agent loads
# the pyhpc driver and the pyhpc-gpu device plugin from its plugin_dir, the node must report
# the GPUs, and jobspecs/gpu.nomad runs nvidia-smi -L and then the CUDA check in IMAGE, which
# must list exactly one GPU and pass. Run as root from the repository root, after
# `scripts/gpu-check.sh --keep-image IMAGE`:
#   NOMAD_BIN=/path/to/nomad scripts/gpu/nomad-gpu.sh [IMAGE]
set -euo pipefail
nomad=${NOMAD_BIN:-nomad}
image=${1:-/var/lib/pyhpc/images/cuda.sqsh}
py=${PYHPC_PYTHON:-python3}
state=$(mktemp -d /tmp/pyhpc-nomad-gpu.XXXXXX)
mkdir "$state/plugins"
export NOMAD_ADDR=http://127.0.0.1:4646
fail() { echo "FAIL: $*"; echo "--- agent log (last 40 lines)"; tail -40 "$state/agent.log"; exit 1; }

"$py" -m nomad_driver.cli.main install-plugin --plugin-dir "$state/plugins" >/dev/null
"$py" -m nomad_driver.cli.main install-plugin --gpu --plugin-dir "$state/plugins" >/dev/null
printf 'plugin_dir = "%s"\ndisable_update_check = true\n' "$state/plugins" >"$state/agent.hcl"
t0=$EPOCHREALTIME
"$nomad" agent -dev -bind 127.0.0.1 -config "$state/agent.hcl" \
    -config plugin-config/pyhpc.hcl -config plugin-config/pyhpc-gpu.hcl >"$state/agent.log" 2>&1 &
agent=$!
# (each part || true: errexit holds inside the trap, and the agent's kill status is not ours)
trap 'kill $agent 2>/dev/null || true; wait $agent 2>/dev/null || true' EXIT

# The node, once it reports a GPU through the device plugin.
devices=""
for _ in $(seq 120); do
    devices=$("$py" - <<'PY' 2>/dev/null || true
import json, urllib.request
url = "http://127.0.0.1:4646/v1/nodes?resources=true"
for node in json.load(urllib.request.urlopen(url, timeout=2)):
    for d in (node.get("NodeResources") or {}).get("Devices") or []:
        ids = [i["ID"] for i in d["Instances"] if i["Healthy"]]
        print(f'{d["Vendor"]}/{d["Type"]}/{d["Name"]}: {len(ids)} healthy {ids}')
PY
)
    [[ -n "$devices" ]] && break
    sleep 0.5
done
[[ -n "$devices" ]] || fail "the node reported no GPU within 60 s"
echo "node devices ($(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $t0}") s after the agent started): $devices"
"$nomad" node status -self -short | sed -n '1,12p' || true

run_job() {   # name, command, args as HCL list; prints the task's output and returns its exit
    sed "s/^job \"gpu\"/job \"$1\"/" jobspecs/gpu.nomad >"$state/$1.nomad"
    "$nomad" job run -detach -var "image=$image" -var "command=$2" -var "args=$3" \
        "$state/$1.nomad" >/dev/null || fail "nomad job run $1"
    for _ in $(seq 240); do
        status=$("$nomad" job status -short "$1" 2>/dev/null | awk '/^Status/ {print $3}')
        [[ "$status" == dead ]] && break
        sleep 0.5
    done
    alloc=$("$nomad" job allocs -t '{{range .}}{{.ID}} {{.ClientStatus}}{{end}}' "$1")
    echo "job $1: allocation ${alloc}"
    "$nomad" alloc logs "${alloc%% *}" gpu || true
    "$nomad" alloc logs -stderr "${alloc%% *}" gpu || true
    [[ "${alloc##* }" == complete ]]
}

run_job gpu-smi /usr/local/nvidia/bin/nvidia-smi '["-L"]' >"$state/smi.out" || fail "nvidia-smi job: $(cat "$state/smi.out")"
cat "$state/smi.out"
listed=$(grep -c '^GPU ' "$state/smi.out" || true)
[[ "$listed" == 1 ]] || fail "the task listed $listed GPUs, not 1"
run_job gpu-cuda /cudacheck '[]' >"$state/cuda.out" || fail "CUDA job: $(cat "$state/cuda.out")"
cat "$state/cuda.out"
echo "PASS: the Nomad job got one GPU, listed it, and ran a CUDA kernel on it"
exit 0
