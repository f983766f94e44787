#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kubectl from the pinned Go
# modules in hack/k8s and hack/etcd. Binaries land in a cache outside the checkout,
# keyed by a hash of the pinning files, so they are rebuilt only when a pin changes.
# Prints the bin directory on stdout (last line).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${PGSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgscale}"
k8s_version="$(awk '/^require k8s.io\/kubernetes /{print $3}' "$here/k8s/go.mod")"
key="$(cat "$here/k8s/go.mod" "$here/k8s/go.sum" "$here/etcd/go.mod" "$here/etcd/go.sum" "$here/build-controlplane.sh" | sha256sum | cut -c1-16)"
bin="$cache_root/controlplane/${k8s_version}-${key}/bin"
if [[ -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" && -x "$bin/kubectl" && -x "$bin/etcd" ]]; then
  echo "control plane ${k8s_version} cached in $bin" >&2
  echo "$bin"; exit 0
fi
mkdir -p "$bin.tmp"
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
# Keep Go's caches outside the checkout (defaults are under $HOME already).
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ld=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $pkg.gitVersion=${k8s_version} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
  ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
echo "building control plane ${k8s_version} into $bin (first build: 10-20 min)" >&2
start=$SECONDS
(cd "$here/etcd" && go build -trimpath -o "$bin.tmp/etcd" go.etcd.io/etcd/server/v3)
(cd "$here/k8s" && for c in kube-apiserver kube-controller-manager kubectl; do
  echo "  go build $c" >&2
  go build -trimpath -ldflags "-s -w $ld" -o "$bin.tmp/$c" "k8s.io/kubernetes/cmd/$c"
done)
rm -rf "$bin"; mv "$bin.tmp" "$bin"
echo "built in $((SECONDS - start))s" >&2
echo "$bin"
