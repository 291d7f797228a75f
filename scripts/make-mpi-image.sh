#!/usr/bin/env bash
# Build the MPI image: Debian (debootstrap, minbase) with Open MPI and MPICH side by side,
# scripts/mpi/{hello,allreduce,pingpong}.c compiled for each, and Debian's LAMMPS (built
# against Open MPI) with the Lennard-Jones benchmark input:
#   /opt/mpi/openmpi/{hello,allreduce,pingpong}   (mpicc.openmpi; run with mpirun.openmpi)
#   /opt/mpi/mpich/{hello,allreduce,pingpong}     (mpicc.mpich;   run with mpiexec.hydra)
#   /usr/bin/lmp, /opt/lammps/in.lj                (jobspecs/lammps.nomad; bench/lammps.py)
#   scripts/make-mpi-image.sh [OUTPUT]   (default /var/lib/pyhpc/images/mpi.sqsh)
# The image is built once and kept in ${PYHPC_IMAGE_CACHE:-~/.cache/pyhpc/images}; a rebuild
# happens only when this script or the C sources change. Needs root, debootstrap, mksquashfs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
out=${1:-/var/lib/pyhpc/images/mpi.sqsh}
cache="${PYHPC_IMAGE_CACHE:-$HOME/.cache/pyhpc/images}"
# Debian's current stable: Open MPI 5.0.7, MPICH 4.2.1 (bookworm's MPICH 4.0.2 left 3 allreduce
# runs in 12 hanging in MPI_Finalize over UCX/TCP; trixie's none in 32).
suite=${PYHPC_MPI_SUITE:-trixie}
# The Debian mirror this machine's apt already uses (its first source), unless one is given.
apt_mirror() {
  awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null ||
    true
  awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' \
    /etc/apt/sources.list 2>/dev/null || true
}
mirror=${PYHPC_MPI_MIRROR:-$(apt_mirror | head -n1)}
if [[ -z "$mirror" ]]; then
  echo "make-mpi-image: no Debian mirror: none in /etc/apt/sources.list(.d); set PYHPC_MPI_MIRROR" >&2
  exit 2
fi
key=$(cat "$0" "$here"/mpi/*.c "$here"/lammps/* | sha256sum | cut -c1-16)
cached="$cache/mpi-$suite-$key.sqsh"
for tool in debootstrap mksquashfs; do
  command -v "$tool" >/dev/null || { echo "make-mpi-image: install $tool first" >&2; exit 1; }
done
mkdir -p "$cache" "$(dirname "$out")"
if [[ ! -s "$cached" ]]; then
  root=$(mktemp -d /var/tmp/pyhpc-mpi-root.XXXXXX)
  trap 'rm -rf --one-file-system "$root" "$root.log"' EXIT
  echo "make-mpi-image: debootstrap $suite (minbase) into $root" >&2
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; echo "make-mpi-image: debootstrap failed" >&2; exit 1; }
  # apt inside the new root resolves what debootstrap's --include cannot (virtual packages).
  echo "make-mpi-image: apt-get install Open MPI, MPICH, gcc, LAMMPS" >&2
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends openmpi-bin libopenmpi-dev mpich libmpich-dev gcc libc6-dev \
    procps lammps >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; echo "make-mpi-image: apt-get failed" >&2; exit 1; }
  rm -f "$root.log"
  mkdir -p "$root/src" "$root/opt/mpi/openmpi" "$root/opt/mpi/mpich" "$root/opt/lammps"
  cp "$here"/mpi/*.c "$root/src/"
  cp "$here"/lammps/* "$root/opt/lammps/"
  for prog in hello allreduce pingpong; do
    chroot "$root" mpicc.openmpi -O2 -o "/opt/mpi/openmpi/$prog" "/src/$prog.c"
    chroot "$root" mpicc.mpich -O2 -o "/opt/mpi/mpich/$prog" "/src/$prog.c"
  done
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tmp="$cached.tmp.$$"
  mksquashfs "$root" "$tmp" -noappend -quiet -comp zstd -all-root >/dev/null
  mv -f "$tmp" "$cached"
fi
cp -f "$cached" "$out.tmp.$$"
mv -f "$out.tmp.$$" "$out"
echo "$out"
