#!/usr/bin/env bash
# Build the test-bed binaries (Nomad, Consul, Vault, cosign) from their Go modules.
#
#   scripts/testbed/build.sh [nomad|consul|vault|cosign|all]      (default: all)
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
# Each product has one accepted licence: the HashiCorp products only as MPL-2.0
# releases (a BUSL release is refused), cosign (sigstore) as Apache-2.0. Before
# compiling, the LICENSE of the product module and of its own sub-modules in the module
# cache is checked, and the build stops unless it is that product's licence.
#
# Environment: PYHPC_TESTBED_CACHE (binary cache), and Go's own (GOMODCACHE, GOCACHE,
# GOPROXY...). A build needs the Go module proxy only while modules are missing from
# the module cache.
#
# Needs: Go >= 1.24 (tool directive; tested with 1.26; cosign's wrapper says go 1.25.0,
# so cosign needs Go >= 1.25) and, for Nomad, a C compiler.
# Cost on 2 cores, empty module and build caches (measured with Go 1.26.8):
#   nomad ~2.5 min, consul ~4 min, vault ~8 min; ~1.2 GB of module zips in all.
#   cosign ~2.5 min (141 s compile+link, 11 s for its 275 module zips, 273 MB).

set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cache_root="${PYHPC_TESTBED_CACHE:-$HOME/.cache/pyhpc/testbed}"

# Product table: main module, main package (when it is not the module's root),
# binary name, CGO_ENABLED, accepted licence.
#  - Nomad is built with cgo like upstream's Linux release (the exec driver's
#    nsenter is a cgo package); raw_exec and external plugins would not need it.
#  - Consul and Vault release builds are pure Go; so is cosign's release build
#    (CGO_ENABLED=0, i.e. without upstream's optional pivkey/pkcs11key tags).
declare -A MODULE=(
  [nomad]=github.com/hashicorp/nomad
  [consul]=github.com/hashicorp/consul
  [vault]=github.com/hashicorp/vault
  [cosign]=github.com/sigstore/cosign/v2
)
declare -A MAIN=([cosign]=github.com/sigstore/cosign/v2/cmd/cosign)
declare -A BINARY=([nomad]=nomad [consul]=consul [vault]=vault [cosign]=cosign)
declare -A CGO=([nomad]=1 [consul]=0 [vault]=0 [cosign]=0)
declare -A LICENSE=([nomad]=MPL-2.0 [consul]=MPL-2.0 [vault]=MPL-2.0 [cosign]=Apache-2.0)
# The product's own sub-modules (pinned by replace in the wrapper): their LICENSE is
# checked too.
declare -A SUBMODULES=(
  [nomad]="github.com/hashicorp/nomad/api"
  [consul]="github.com/hashicorp/consul/api github.com/hashicorp/consul/sdk github.com/hashicorp/consul/proto-public"
  [vault]="github.com/hashicorp/vault/api github.com/hashicorp/vault/sdk"
  [cosign]=""
)
ORDER=(nomad consul vault cosign)
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
# module cache after `go mod download`) must carry the product's licence (LICENSE[...]).
check_license() {
  local p="$1" want="${LICENSE[$1]}" mod dir lic pat name n
  case "$want" in
    # Upstream's header reads "Mozilla Public License, version 2.0".
    MPL-2.0) pat='Mozilla Public License,? *(version|v\.?) *2\.0'; name='the Mozilla Public License 2.0'; n=1 ;;
    # The Apache text starts "Apache License" / "Version 2.0, January 2004" (two lines).
    Apache-2.0) pat='^ *Version 2\.0, January 2004'; name='the Apache License 2.0'; n=2 ;;
    *) die "$p: unknown licence '$want' in the product table" ;;
  esac
  for mod in "${MODULE[$p]}" ${SUBMODULES[$p]}; do
    # -m resolves replaces: this is the directory that will really be compiled.
    dir=$(cd "$here/$p" && go list -m -f '{{with .Replace}}{{.Dir}}{{else}}{{.Dir}}{{end}}' "$mod") \
      || die "$p: cannot locate $mod in the module cache"
    lic="$dir/LICENSE"
    [[ -n "$dir" && -f "$lic" ]] || die "$p: $mod has no LICENSE file (${dir:-not downloaded}); refusing to build"
    # HashiCorp's BUSL releases say "Business Source License": refused whatever the
    # product. The Apache text must also open with its title.
    if grep -qi 'Business Source License' "$lic" \
       || ! grep -qiE "$pat" "$lic" \
       || { [[ "$want" == Apache-2.0 ]] && ! head -n 5 "$lic" | grep -q 'Apache License'; }; then
      die "$p: $mod is not licensed under $name (see $lic);" \
          "only $want releases of $p may be used for the test bed"
    fi
    log "$p: license OK ($want): $mod ($(basename "$dir")):" \
        "$(grep -m"$n" -iE "^ *Apache License|$pat" "$lic" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//')"
  done
}

# patch_sources PRODUCT DIR: prepare source patches in DIR and write the extra
# `go build` flags that use them (or that the product's release build sets), one a
# line, to DIR/build-flags (empty if none).
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
    cosign)
      # No patch. Upstream's Makefile stamps the version with -X; built from the
      # wrapper (main module version "(devel)") `cosign version` would say "devel".
      printf '%s\n' "-ldflags=-X sigs.k8s.io/release-utils/version.gitVersion=v$(version_of cosign)" \
        >"$dir/build-flags"
      ;;
  esac
}

# version_line BINARY -> the first line of `BINARY version` that has a version number
# (cosign's output opens with an ASCII-art banner; it reads "GitVersion:    v2.6.5").
version_line() {
  "$1" version 2>/dev/null | grep -m1 -E '[0-9]+\.[0-9]+\.[0-9]+' || true
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
  local pkg="${MAIN[$p]:-${MODULE[$p]}}"
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
  log "$p $ver: building $pkg (CGO_ENABLED=$cgo) into $dest"

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
  log "$p: go build ${flags[*]} $pkg (the long part; $(nproc) CPUs)"
  (cd "$here/$p" && CGO_ENABLED="$cgo" go build "${flags[@]}" -o "$tmp" "$pkg") \
    || die "$p: go build failed"
  t_build=$(date +%s)
  "$tmp" version >/dev/null 2>&1 || die "$p: the new binary does not run '$bin version'"
  mv -f "$tmp" "$dest"
  printf '%s\n' "$recipe" >"$dest_dir/recipe"
  rm -rf "$work"
  trap - EXIT

  local total=$((t_build - t_start))
  log "$p: $(version_line "$dest")"
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
    nomad|consul|vault|cosign) todo=("$what") ;;
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
