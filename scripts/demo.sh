#!/usr/bin/env bash
# Set everything up, start a loopback Nomad/Consul/Vault cluster with the pyhpc plugin, run
# jobspecs/hello.nomad, then register the flagship jobspecs/hpc.nomad, dispatch one run of it
# with Nomad's CLI and two more with `pyhpc dispatch` (one per federated region), printing their
# output. `scripts/testbed/cluster.sh down` stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PYHPC_PYTHON="$PWD/.venv/bin/python"
scripts/testbed/cluster.sh up
eval "$(scripts/testbed/cluster.sh env)"

nomad job run jobspecs/hello.nomad
alloc=$(nomad job allocs -t '{{ (index . 0).ID }}' hello)
echo "--- nomad alloc logs $alloc hello"
nomad alloc logs "$alloc" hello

nomad job run jobspecs/hpc.nomad
printf 'line one\nline two\n' >/tmp/pyhpc-demo-input.txt
child=$(nomad job dispatch -detach -meta size=1000000 -meta label=demo -meta hold=1 hpc \
          /tmp/pyhpc-demo-input.txt | awk '/Dispatched Job ID/ { print $NF }')
echo "--- dispatched $child; waiting for it"
for _ in $(seq 1 60); do
  status=$(nomad job status -short "$child" | awk '/^Status/ { print $3 }')
  [[ "$status" == dead ]] && break
  sleep 1
done
alloc=$(nomad job allocs -t '{{ (index . 0).ID }}' "$child")
echo "--- nomad alloc logs $alloc solver"
nomad alloc logs "$alloc" solver
echo "--- pyhpc dispatch hpc --count 2 (spread over regions global and east)"
.venv/bin/pyhpc dispatch hpc --count 2 --meta size=1000 --meta label=federated --meta hold=0 \
  --payload /tmp/pyhpc-demo-input.txt --output
echo "--- the cluster keeps running; stop it with: scripts/testbed/cluster.sh down"
