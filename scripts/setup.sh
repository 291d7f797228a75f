#!/usr/bin/env bash
# Install everything pyhpc's demo and tests need on a fresh Debian machine (run as root):
# Debian packages, a virtualenv with the package and its test tools in .venv, and the test
# bed (Nomad, Consul, Vault and cosign built from their Go modules into ~/.cache/pyhpc/testbed).
# Safe to re-run: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[setup %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

packages=(squashfs-tools squashfs-tools-ng busybox-static util-linux iproute2 gcc libc6-dev file procps
          docker-registry umoci skopeo apache2-utils openssl debootstrap curl charliecloud-runtime)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Slurm for `pyhpc run` under srun (tests/e2e/test_slurm.py): its own step, so a package whose
# service cannot start on this machine does not stop the rest (those tests then skip, saying so).
slurm=(slurmctld slurmd slurm-client munge libpmix-dev)
missing=()
for p in "${slurm[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Slurm: ${missing[*]}"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || say "WARNING: Slurm did not install; tests/e2e/test_slurm.py will skip"
fi

python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import nomad_driver, grpc_tools, hypothesis, pytest" 2>/dev/null \
   || [[ pyproject.toml -nt .venv/.installed ]]; then
  say "installing pyhpc and its test tools into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # compat: a plain path in a .pth. The default editable finder costs every `pyhpc run` 8 ms
  # of imports (pathlib, re) before it does anything; a setuptools without compat gets it.
  .venv/bin/pip install -q -e '.[dev]' --config-settings editable_mode=compat 2>/dev/null \
    || .venv/bin/pip install -q -e '.[dev]'
  touch .venv/.installed
fi
# Byte-compiled once: each task's supervisor and `pyhpc run` start from .pyc files, even where
# PYTHONDONTWRITEBYTECODE stops Python from writing them itself.
.venv/bin/python -m compileall -q nomad_driver >/dev/null

say "building the test bed (cached after the first run)"
scripts/testbed/build.sh all

say "building the demo image"
scripts/make-demo-image.sh >/dev/null
say "ready"
