#!/usr/bin/env bash
# Set everything up, start a loopback Nomad/Consul/Vault cluster with the pyhpc plugin, and run
# jobspecs/hello.nomad, printing its output. `scripts/testbed/cluster.sh down` stops the cluster.
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
echo "--- the cluster keeps running; stop it with: scripts/testbed/cluster.sh down"
