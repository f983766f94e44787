#!/usr/bin/env bash
# Print the paths of CloudNativePG's Cluster and Pooler CRDs (one per line, in that order),
# from the module pinned in hack/cnpg/go.mod. The module is downloaded through the Go module
# proxy and verified against go.sum (into the Go module cache); the two CRDs are copied to
# ~/.cache/pgscale/cnpg/<version>/, outside the checkout. `crds.sh --source` prints the
# module's directory instead (the tests read CloudNativePG's parameter lists from its source).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module=github.com/cloudnative-pg/cloudnative-pg
version="$(awk -v m="$module" '$1 == "require" && $2 == m {print $3}' "$here/go.mod")"
[[ -n "$version" ]] || { echo "crds.sh: no 'require $module' in $here/go.mod" >&2; exit 1; }
cache_root="${PGSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgscale}"
out="$cache_root/cnpg/$version"
crds=(postgresql.cnpg.io_clusters.yaml postgresql.cnpg.io_poolers.yaml)

module_dir() {
  command -v go >/dev/null || { echo "crds.sh: Go is required to download $module" >&2; exit 1; }
  local json dir
  if ! json="$(cd "$here" && GOWORK=off GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$module@$version")"; then
    echo "crds.sh: go mod download $module@$version failed${json:+: $json}" >&2
    exit 1
  fi
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
  [[ -n "$dir" && -d "$dir" ]] || { echo "crds.sh: no module directory in: $json" >&2; exit 1; }
  echo "$dir"
}

if [[ "${1:-}" == "--source" ]]; then
  module_dir; exit 0
fi
if [[ ! -f "$out/${crds[0]}" || ! -f "$out/${crds[1]}" ]]; then
  dir="$(module_dir)"
  mkdir -p "$out.tmp"
  for crd in "${crds[@]}"; do
    [[ -f "$dir/config/crd/bases/$crd" ]] || { echo "crds.sh: $module@$version has no config/crd/bases/$crd" >&2; exit 1; }
    cp "$dir/config/crd/bases/$crd" "$out.tmp/$crd"
  done
  chmod -R u+w "$out.tmp"
  rm -rf "$out"; mv "$out.tmp" "$out"
fi
for crd in "${crds[@]}"; do echo "$out/$crd"; done
