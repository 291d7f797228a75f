#!/usr/bin/env bash
# The test bed's multi-node network: N network namespaces on one bridge, as N machines on a
# switch, none of it on this machine's own interfaces.
#
#   scripts/testbed/netns.sh up PREFIX LINK NET N [HOSTLINK]
#   scripts/testbed/netns.sh down PREFIX [HOSTLINK]
#
# Namespace PREFIX-i (i = 1..N) gets lo and a veth LINKi with address NET.i/24, whose other
# end (LINKi-sw) sits on bridge br0 in namespace PREFIX-sw. With HOSTLINK, this machine joins
# the bridge too, as NET.254 on a veth of that name. `up` first removes what a previous `up`
# of the same PREFIX left. Used by mpi-nodes.sh, slurm.sh and the secured bed's MPI nodes.
set -euo pipefail

die() { printf 'netns.sh: error: %s\n' "$*" >&2; exit 2; }

down() {
  local prefix=$1 hostlink=${2:-} ns
  [[ -z "$hostlink" ]] || ip link del "$hostlink" 2>/dev/null || true
  for ns in $(ip netns list 2>/dev/null | awk -v p="$prefix-" 'index($1, p) == 1 {print $1}'); do
    ip netns del "$ns"
  done
}

up() {
  local prefix=$1 link=$2 net=$3 n=$4 hostlink=${5:-} sw=$1-sw i
  [[ "$n" =~ ^[1-9][0-9]*$ && "$n" -le 253 ]] || die "N must be 1 to 253, not '$n'"
  down "$prefix" "$hostlink"
  ip netns add "$sw"
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  for ((i = 1; i <= n; i++)); do
    ip netns add "$prefix-$i"
    ip -n "$prefix-$i" link set lo up
    ip link add "$link$i" netns "$prefix-$i" type veth peer name "$link$i-sw" netns "$sw"
    ip -n "$sw" link set "$link$i-sw" master br0 up
    ip -n "$prefix-$i" addr add "$net.$i/24" dev "$link$i"
    ip -n "$prefix-$i" link set "$link$i" up
  done
  if [[ -n "$hostlink" ]]; then
    ip link add "$hostlink" type veth peer name "$hostlink-sw" netns "$sw"
    ip -n "$sw" link set "$hostlink-sw" master br0 up
    ip addr add "$net.254/24" dev "$hostlink"
    ip link set "$hostlink" up
  fi
}

case "${1:-}" in
  up) (($# == 5 || $# == 6)) || die "usage: netns.sh up PREFIX LINK NET N [HOSTLINK]"; shift; up "$@" ;;
  down) (($# == 2 || $# == 3)) || die "usage: netns.sh down PREFIX [HOSTLINK]"; shift; down "$@" ;;
  *) die "usage: netns.sh up PREFIX LINK NET N [HOSTLINK] | down PREFIX [HOSTLINK]" ;;
esac
