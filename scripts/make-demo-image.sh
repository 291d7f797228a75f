#!/usr/bin/env bash
# Build the small SquashFS image the example jobs run: busybox (from Debian's busybox-static)
# plus /etc/passwd and /etc/group with root and nobody.
#   scripts/make-demo-image.sh [OUTPUT]   (default /var/lib/pyhpc/images/busybox.sqsh)
set -euo pipefail
out=${1:-/var/lib/pyhpc/images/busybox.sqsh}
busybox=$(command -v busybox || true)
if [[ -z "$busybox" ]] || ! file -L "$busybox" 2>/dev/null | grep -q "statically linked"; then
  [[ -x /bin/busybox ]] && busybox=/bin/busybox
fi
[[ -n "$busybox" && -x "$busybox" ]] || { echo "make-demo-image: install busybox-static first" >&2; exit 1; }
command -v mksquashfs >/dev/null || { echo "make-demo-image: install squashfs-tools first" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,tmp,root,home} "$(dirname "$out")"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [[ "$applet" == busybox ]] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
tmp="$out.tmp.$$"
mksquashfs "$root" "$tmp" -noappend -quiet -comp zstd -all-root >/dev/null
mv -f "$tmp" "$out"
echo "$out"
