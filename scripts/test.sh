#!/usr/bin/env bash
# The test command: set up what is missing, then run every test, the end-to-end tests against
# the real Nomad/Consul/Vault test bed included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PYHPC_PYTHON="$PWD/.venv/bin/python"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
