#!/usr/bin/env bash
# The GPU check: device plugin fingerprint and reserve over gRPC, nvidia-smi and a CUDA kernel
# in pyhpc containers, one GPU means one GPU, injection cost. Needs root and an NVIDIA GPU;
# exits 77 (skipped) without one. See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[[ -x "$py" ]] || py=python3
exec "$py" scripts/gpu_check.py "$@"
