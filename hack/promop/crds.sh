#!/usr/bin/env bash
# Print the paths of prometheus-operator's PrometheusRule and PodMonitor CRDs (one per
# line, in that order), from the module pinned in hack/promop/go.mod. The module is
# downloaded through the Go module proxy, verified against go.sum, and kept in the Go
# module cache (outside the checkout); nothing is written here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module=github.com/prometheus-operator/prometheus-operator
version="$(awk -v m="$module" '$1 == "require" && $2 == m {print $3}' "$here/go.mod")"
[[ -n "$version" ]] || { echo "crds.sh: no 'require $module' in $here/go.mod" >&2; exit 1; }
command -v go >/dev/null || { echo "crds.sh: Go is required to download $module" >&2; exit 1; }

if ! json="$(cd "$here" && GOWORK=off GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "$module@$version")"; then
  echo "crds.sh: go mod download $module@$version failed${json:+: $json}" >&2
  exit 1
fi
dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
[[ -n "$dir" && -d "$dir" ]] || { echo "crds.sh: no module directory in: $json" >&2; exit 1; }

crd_dir="$dir/example/prometheus-operator-crd"
for plural in prometheusrules podmonitors; do
  file="$crd_dir/monitoring.coreos.com_${plural}.yaml"
  [[ -f "$file" ]] || { echo "crds.sh: $module@$version has no $file" >&2; exit 1; }
  echo "$file"
done
