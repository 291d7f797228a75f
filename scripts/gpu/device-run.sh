#!/usr/bin/env bash
# The GPU check (scripts/gpu-check.sh) on a bare GPU machine with no network: a lent test
# machine, or a fresh cloud GPU instance. BUNDLE (default .dev) holds what such a machine may
# lack, made beforehand on a networked machine of the same architecture:
#   whl/        the runtime wheels of pyproject.toml's dependencies, for the machine's Python
#   deb/        squashfs-tools and the libraries it and pyseccomp need (used only when missing)
#   busybox.sqsh  scripts/make-demo-image.sh's output
#   cudacheck   scripts/gpu/cudacheck.c built with gcc (used only when the machine has no gcc)
#   nomad.xz    optional: the test bed's Nomad binary, xz-compressed; then jobspecs/gpu.nomad
#               also runs through a Nomad agent (scripts/gpu/nomad-gpu.sh)
# It prints what the machine offers (kernel, SquashFS, loop devices, cgroups, driver), installs
# the wheels into /tmp/site, runs the check, and on failure adds what a diagnosis needs.
# The log also goes to $OUT/gpu-check.log when OUT is set. Run as root from the repository root:
#   scripts/gpu/device-run.sh [BUNDLE]
set -uo pipefail
bundle=$(realpath "${1:-.dev}")
out=${OUT:-/tmp/pyhpc-gpu-check}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1

echo "== the machine"
uname -srm
(. /etc/os-release && echo "$PRETTY_NAME")
python3 -V
ldd --version | head -1
nvidia-smi -L || echo "nvidia-smi: not found or failed"
modprobe -q loop 2>/dev/null
modprobe -q squashfs 2>/dev/null
echo "squashfs in /proc/filesystems: $(grep -cw squashfs /proc/filesystems)"
echo "loop-control: $(ls /dev/loop-control 2>&1)"
echo "cgroup fs: $(stat -fc %T /sys/fs/cgroup)"
echo "user namespaces: $(cat /proc/sys/user/max_user_namespaces)"
for tool in gcc mksquashfs ldconfig; do echo "$tool: $(command -v $tool || echo missing)"; done
ldconfig -p | grep -E 'libcuda\.so|libnvidia-ml\.so|libseccomp\.so|liblzo2' || true
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
head -20 /proc/driver/nvidia/gpus/*/information 2>&1
smi=$(command -v nvidia-smi) && ls -l "$smi" && file "$smi" 2>/dev/null \
    && { head -c 2 "$smi" | grep -q '#!' && cat "$smi"; }
echo

echo "== setting up"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$bundle"/whl/*.whl || { echo "wheel install failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
tools=/tmp/pyhpc-tools
for deb in "$bundle"/deb/*.deb; do dpkg -x "$deb" "$tools"; done
# Only what is missing goes into /usr/local, so the machine's own packages are left alone.
for lib in libseccomp.so.2 liblzo2.so.2; do
    if ! ldconfig -p | grep -q "$lib "; then
        find "$tools" -name "$lib*" -exec cp -v {} /usr/local/lib/ \;
    fi
done
ldconfig
command -v mksquashfs >/dev/null || cp -v "$tools"/usr/bin/mksquashfs /usr/local/bin/
mkdir -p /var/lib/pyhpc/images
cp "$bundle"/busybox.sqsh /var/lib/pyhpc/images/busybox.sqsh
extra=()
command -v gcc >/dev/null || extra=(--cudacheck "$bundle/cudacheck")
echo

echo "== the check"
PYTHONUNBUFFERED=1 timeout 420 scripts/gpu-check.sh "${extra[@]}" \
    --keep-image /var/lib/pyhpc/images/cuda.sqsh --json "$out/gpu.json"
rc=$?
echo "gpu-check exit status: $rc"
if [[ -f "$bundle/nomad.xz" && -f /var/lib/pyhpc/images/cuda.sqsh ]]; then
    echo
    echo "== the GPU job through Nomad"
    xz -dc "$bundle/nomad.xz" >/tmp/nomad && chmod +x /tmp/nomad
    /tmp/nomad version | head -1
    NOMAD_BIN=/tmp/nomad timeout 300 scripts/gpu/nomad-gpu.sh /var/lib/pyhpc/images/cuda.sqsh
    nomad_rc=$?
    echo "nomad-gpu exit status: $nomad_rc"
    [[ $nomad_rc == 0 ]] || rc=$nomad_rc
fi
if [[ $rc != 0 && $rc != 77 ]]; then
    echo "== diagnosis"
    python3 -m nomad_driver.cli.main run /var/lib/pyhpc/images/busybox.sqsh -- /bin/true
    echo "plain run: $?"
    python3 -m nomad_driver.cli.main run --gpus 1 /var/lib/pyhpc/images/busybox.sqsh -- \
        sh -c 'ls -l /dev /usr/local/nvidia/*; env | grep -i -e cuda -e nvidia -e ld_'
    echo "--gpus 1 run: $?"
    ls -l /dev/nvidia* /usr/local/nvidia/lib64 2>&1 | head -40
fi
exit $rc
