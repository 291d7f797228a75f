#!/usr/bin/env bash
# Build the test-bed binaries (Nomad, Consul, Vault) from their Go modules.
#
#   scripts/testbed/build.sh [nomad|consul|vault|all]      (default: all)
#
# Nothing is downloaded from release sites: each product is built with `go build`
# from a small wrapper module (scripts/testbed/<product>/go.mod + go.sum, with a
# `tool` directive for the product's main package) through the Go module proxy.
# The committed go.sum is authoritative (GOFLAGS=-mod=readonly).
#
# Binaries land in a cache outside the checkout and are reused:
#   ${PYHPC_TESTBED_CACHE:-$HOME/.cache/pyhpc/testbed}/<product>-<version>/<binary>
# The version is read from the wrapper's go.mod; a binary is rebuilt when the wrapper's
# go.mod/go.sum, the Go version or this script's recipe (RECIPE_REV) changed. Each
# directory also holds build-info.txt (Go version, wall time) and recipe (the digest).
#
# Only MPL-2.0 releases may be used: before compiling, the LICENSE of the product
# module and of its own sub-modules in the module cache is checked, and the build
# stops unless it is the Mozilla Public License 2.0.
#
# Environment: PYHPC_TESTBED_CACHE (binary cache), and Go's own (GOMODCACHE, GOCACHE,
# GOPROXY...). A build needs the Go module proxy only while modules are missing from
# the module cache.
#
# Needs: Go >= 1.24 (tool directive; tested with 1.26) and, for Nomad, a C compiler.
# Cost on 2 cores, empty module and build caches (measured with Go 1.26.8):
#   nomad ~2.5 min, consul ~4 min, vault ~8 min; ~1.2 GB of module zips in all.

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache_root="${PYHPC_TESTBED_CACHE:-$HOME/.cache/pyhpc/testbed}"

# Product table: main module (= main package), binary name, CGO_ENABLED.
#  - Nomad is built with cgo like upstream's Linux release (the exec driver's
#    nsenter is a cgo package); raw_exec and external plugins would not need it.
#  - Consul and Vault release builds are pure Go.
declare -A MODULE=(
  [nomad]=github.com/hashicorp/nomad
  [consul]=github.com/hashicorp/consul
  [vault]=github.com/hashicorp/vault
)
declare -A BINARY=([nomad]=nomad [consul]=consul [vault]=vault)
declare -A CGO=([nomad]=1 [consul]=0 [vault]=0)
# The product's own sub-modules (pinned by replace in the wrapper): their LICENSE is
# checked too.
declare -A SUBMODULES=(
  [nomad]="github.com/hashicorp/nomad/api"
  [consul]="github.com/hashicorp/consul/api github.com/hashicorp/consul/sdk github.com/hashicorp/consul/proto-public"
  [vault]="github.com/hashicorp/vault/api github.com/hashicorp/vault/sdk"
)
ORDER=(nomad consul vault)
# Bump when patch_sources or the build flags change: a cached binary is reused only if
# it was built from the same wrapper go.mod/go.sum and the same recipe revision.
RECIPE_REV=1

# Deterministic, offline-friendly Go settings.
#  -mod=readonly     use the committed go.sum, never rewrite go.mod/go.sum
#  -buildvcs=false   the wrapper sits inside this repository; do not stamp its git state
#  GOTOOLCHAIN=local never try to fetch another Go toolchain
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN=local
export CHECKPOINT_DISABLE=1

t0_script=$(date +%s)
log() { printf '[%s +%4ss] %s\n' "$(date +%H:%M:%S)" "$(($(date +%s) - t0_script))" "$*"; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# version_of PRODUCT -> "1.6.3" (from the wrapper's require line, without the "v")
version_of() {
  local p="$1" mod="${MODULE[$1]}" v
  v=$(awk -v m="$mod" '$1 == m && $2 ~ /^v/ { sub(/^v/, "", $2); print $2; exit }' \
        "$here/$p/go.mod")
  [[ -n "$v" ]] || die "cannot find '$mod vX.Y.Z' in $here/$p/go.mod"
  printf '%s\n' "$v"
}

check_toolchain() {
  command -v go >/dev/null || die "go is not installed (need Go >= 1.24)"
  local gv
  gv=$(go env GOVERSION)            # e.g. go1.26.8
  local minor=${gv#go1.}; minor=${minor%%.*}
  [[ "$minor" =~ ^[0-9]+$ && "$minor" -ge 24 ]] \
    || die "$gv is too old: the wrapper modules use the 'tool' directive (Go >= 1.24)"
}

# check_license PRODUCT: the product module and its sub-modules (all already in the
# module cache after `go mod download`) must be MPL-2.0.
check_license() {
  local p="$1" mod dir lic
  for mod in "${MODULE[$p]}" ${SUBMODULES[$p]}; do
    # -m resolves replaces: this is the directory that will really be compiled.
    dir=$(cd "$here/$p" && go list -m -f '{{with .Replace}}{{.Dir}}{{else}}{{.Dir}}{{end}}' "$mod") \
      || die "$p: cannot locate $mod in the module cache"
    lic="$dir/LICENSE"
    [[ -n "$dir" && -f "$lic" ]] || die "$p: $mod has no LICENSE file (${dir:-not downloaded}); refusing to build"
    # Upstream's header reads "Mozilla Public License, version 2.0"; BUSL releases
    # say "Business Source License".
    if grep -qi 'Business Source License' "$lic" \
       || ! grep -qiE 'Mozilla Public License,? *(version|v\.?) *2\.0' "$lic"; then
      die "$p: $mod is not licensed under the Mozilla Public License 2.0 (see $lic);" \
          "only MPL-2.0 releases may be used for the test bed"
    fi
    log "$p: license OK: $mod ($(basename "$dir")): $(grep -im1 'Mozilla Public License' "$lic" | tr -s ' ')"
  done
}

# patch_sources PRODUCT DIR: prepare source patches in DIR and write the extra
# `go build` flags that use them, one a line, to DIR/build-flags (empty if none).
# A patched dependency is a copy of the module from the module cache, edited with
# exact-match edits at build time, and swapped in through a temporary copy of the
# wrapper's go.mod/go.sum (-modfile) that replaces the module with that directory.
# No upstream code is copied into this repository, the committed go.mod still pins the
# exact upstream version, and a patch that no longer applies stops the build.
# (`go build -overlay` cannot do this: it refuses files inside GOMODCACHE.)
patch_sources() {
  local p="$1" dir="$2"
  : >"$dir/build-flags"
  case "$p" in
    vault)
      # Vault 1.14.2 is built against the sdk tag v0.9.2 (see vault/go.mod for why).
      # That tag, cut from Vault's main branch, added an init-time check that panics
      # on paths defining a CreateOperation without an ExistenceCheck; Vault 1.14's own
      # sdk never had it and 1.14's sys backend trips it ("managed-keys/..."): the dev
      # server dies at start. Turn the two panics back into no-ops.
      local sdkmod=github.com/hashicorp/vault/sdk src f
      local msg='panic(fmt.Sprintf("Pattern %v defines a CreateOperation but no ExistenceCheck", p.Pattern))'
      src=$(cd "$here/$p" && go list -m -f '{{with .Replace}}{{.Dir}}{{else}}{{.Dir}}{{end}}' "$sdkmod")
      [[ -d "$src" ]] || die "vault: $sdkmod not in the module cache"
      cp -R "$src" "$dir/sdk" && chmod -R u+w "$dir/sdk"
      f="$dir/sdk/framework/backend.go"
      [[ $(grep -cF "$msg" "$f") == 2 ]] \
        || die "vault: patch does not apply to $src/framework/backend.go (expected the check twice)"
      awk -v m="$msg" '{ i = index($0, m)
          if (i) $0 = substr($0, 1, i - 1) "// disabled for the pyhpc test bed (not in the Vault 1.14 sdk)"
          print }' "$src/framework/backend.go" >"$f"
      [[ $(grep -cF "$msg" "$f") == 0 ]] || die "vault: patch failed"
      cp "$here/$p/go.mod" "$dir/go.mod"
      cp "$here/$p/go.sum" "$dir/go.sum"
      (cd "$here/$p" && go mod edit -modfile="$dir/go.mod" -replace="$sdkmod=$dir/sdk")
      log "vault: patched copy of $(basename "$src") (CreateOperation/ExistenceCheck panic disabled)"
      printf '%s\n' "-modfile=$dir/go.mod" >"$dir/build-flags"
      ;;
  esac
}

# recipe_of PRODUCT -> a digest of everything that decides what gets built (the
# wrapper's go.mod in canonical form, so comments do not count, and its go.sum)
recipe_of() {
  { printf 'rev=%s go=%s cgo=%s\n' "$RECIPE_REV" "$(go env GOVERSION)" "${CGO[$1]}"
    (cd "$here/$1" && go mod edit -json)
    cat "$here/$1/go.sum"; } | sha256sum | cut -c1-16
}

build_one() {
  local p="$1"
  local mod="${MODULE[$p]}" bin="${BINARY[$p]}" cgo="${CGO[$p]}"
  local ver dest_dir dest
  ver=$(version_of "$p")
  dest_dir="$cache_root/$p-$ver"
  dest="$dest_dir/$bin"

  local recipe
  recipe=$(recipe_of "$p")
  if [[ -x "$dest" ]] && "$dest" version >/dev/null 2>&1; then
    if [[ "$(cat "$dest_dir/recipe" 2>/dev/null)" == "$recipe" ]]; then
      log "$p $ver: cached ($dest)"
      return 0
    fi
    log "$p $ver: $dest was built from another wrapper go.mod/go.sum or recipe: rebuilding"
  fi

  if [[ "$cgo" == 1 ]] && ! command -v "${CC:-gcc}" >/dev/null; then
    die "$p: needs a C compiler (CGO_ENABLED=1); install gcc"
  fi

  local t_start t_dl t_build
  t_start=$(date +%s)
  log "$p $ver: building $mod (CGO_ENABLED=$cgo) into $dest"

  # 1. Modules. `go mod download` fetches everything the wrapper's go.mod lists and
  #    verifies it against the committed go.sum.
  log "$p: downloading modules (GOMODCACHE=$(go env GOMODCACHE))"
  (cd "$here/$p" && go mod download) || die "$p: go mod download failed"
  t_dl=$(date +%s)
  log "$p: modules ready in $((t_dl - t_start)) s"

  # 2. License gate.
  check_license "$p"

  # 3. Compile into a temporary file next to the destination, then rename it into
  #    place (atomic on one filesystem), so an interrupted build never leaves a
  #    half-written binary that later looks "cached".
  mkdir -p "$dest_dir"
  local tmp="$dest_dir/.$bin.tmp.$$" work="$dest_dir/.work.$$"
  trap 'rm -rf "'"$tmp"'" "'"$work"'"' EXIT
  mkdir -p "$work"
  patch_sources "$p" "$work"
  local -a flags=(-trimpath)
  mapfile -t -O 1 flags <"$work/build-flags"
  log "$p: go build ${flags[*]} $mod (the long part; $(nproc) CPUs)"
  (cd "$here/$p" && CGO_ENABLED="$cgo" go build "${flags[@]}" -o "$tmp" "$mod") \
    || die "$p: go build failed"
  t_build=$(date +%s)
  "$tmp" version >/dev/null 2>&1 || die "$p: the new binary does not run '$bin version'"
  mv -f "$tmp" "$dest"
  printf '%s\n' "$recipe" >"$dest_dir/recipe"
  rm -rf "$work"
  trap - EXIT

  local total=$((t_build - t_start))
  log "$p: $("$dest" version | head -n1)"
  log "$p: built in ${total} s (modules $((t_dl - t_start)) s, compile+link $((t_build - t_dl)) s)"
  # Keep a record next to the binary (which Go, how long).
  printf 'product=%s version=%s go=%s cgo=%s built=%s wall_s=%s download_s=%s compile_s=%s\n' \
    "$p" "$ver" "$(go env GOVERSION)" "$cgo" "$(date -u +%FT%TZ)" "$total" \
    "$((t_dl - t_start))" "$((t_build - t_dl))" >"$dest_dir/build-info.txt"
}

main() {
  local what="${1:-all}"
  local -a todo
  case "$what" in
    all) todo=("${ORDER[@]}") ;;
    nomad|consul|vault) todo=("$what") ;;
    -h|--help|help) usage ;;
    *) usage ;;
  esac
  check_toolchain
  log "cache: $cache_root; $(go env GOVERSION); products: ${todo[*]}"
  local p
  for p in "${todo[@]}"; do
    build_one "$p"
  done
  log "done in $(($(date +%s) - t0_script)) s"
}

main "$@"
