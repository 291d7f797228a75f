#!/usr/bin/env bash
# Set everything up, start a loopback Nomad/Consul/Vault cluster with the pyhpc plugin, and run
# jobspecs/hello.nomad, printing its output. `scripts/testbed/cluster.sh down` stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/testbed/cluster.sh up
eval "$(scripts/testbed/cluster.sh env)"
nomad=$(scripts/testbed/cluster.sh nomad-path)
"$nomad" job run jobspecs/hello.nomad
alloc=$("$nomad" job allocs -json hello | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["ID"])')
echo "--- nomad alloc logs $alloc hello"
"$nomad" alloc logs "$alloc" hello
