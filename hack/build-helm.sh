#!/usr/bin/env bash
# Build the `helm` binary from the Go module pinned in hack/helm. It lands in a cache
# outside the checkout, keyed by a hash of the pinning files and this script, so it is
# rebuilt only when a pin changes (as hack/build-controlplane.sh does for the control
# plane). Prints the binary's path on stdout (last line).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${PGSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgscale}"
version="$(awk '$1 == "require" && $2 == "helm.sh/helm/v3" {print $3}' "$here/helm/go.mod")"
[[ -n "$version" ]] || { echo "build-helm.sh: no 'require helm.sh/helm/v3' in $here/helm/go.mod" >&2; exit 1; }
key="$(cat "$here/helm/go.mod" "$here/helm/go.sum" "$here/build-helm.sh" | sha256sum | cut -c1-16)"
dir="$cache_root/helm/${version}-${key}"
if [[ -x "$dir/bin/helm" ]]; then
  echo "helm ${version} cached in $dir/bin" >&2
  echo "$dir/bin/helm"; exit 0
fi
command -v go >/dev/null || { echo "build-helm.sh: Go is required to build helm" >&2; exit 1; }
# Keep Go's caches outside the checkout (defaults are under $HOME already).
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
# The Kubernetes version `helm template` and `helm lint` assume, as Helm's Makefile sets it:
# one above client-go's major (v0.34 -> 1.34).
client_go="$(awk '$1 == "k8s.io/client-go" {print $2}' "$here/helm/go.mod")"
k8s_minor="$(cut -d. -f2 <<<"$client_go")"
ld="-s -w -X helm.sh/helm/v3/internal/version.version=${version} -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=${k8s_minor}"
done
echo "building helm ${version} into $dir/bin (first build: a few minutes)" >&2
start=$SECONDS
rm -rf "$dir.tmp"; mkdir -p "$dir.tmp/bin"
(cd "$here/helm" && go build -trimpath -ldflags "$ld" -o "$dir.tmp/bin/helm" helm.sh/helm/v3/cmd/helm)
rm -rf "$dir"; mv "$dir.tmp" "$dir"
echo "built in $((SECONDS - start))s" >&2
echo "$dir/bin/helm"
