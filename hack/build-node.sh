#!/usr/bin/env bash
# Build the test node's binaries from pinned Go modules: kubelet, kube-proxy and
# kube-scheduler from hack/k8s (the control plane's pins), CoreDNS from hack/coredns (only the
# plugins the node's Corefile uses), and the pod sandbox's pause program from hack/pause. Binaries land in a cache outside
# the checkout, keyed by a hash of the pinning files, so they are rebuilt only when a pin
# changes. containerd, runc and the CNI plugins come from Debian (hack/setup.sh).
# Prints the bin directory on stdout (last line).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${PGSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgscale}"
k8s_version="$(awk '/^require k8s.io\/kubernetes /{print $3}' "$here/k8s/go.mod")"
coredns_version="$(awk '/^require github.com\/coredns\/coredns /{print $3}' "$here/coredns/go.mod")"
key="$(cat "$here/k8s/go.mod" "$here/k8s/go.sum" "$here/coredns/go.mod" "$here/coredns/go.sum" "$here/coredns/main.go" \
  "$here/pause/go.mod" "$here/pause/main.go" "$here/build-node.sh" | sha256sum | cut -c1-16)"
bin="$cache_root/node/${k8s_version}-${key}/bin"
tools=(kubelet kube-proxy kube-scheduler coredns pause)
cached=1
for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || cached=0; done
if ((cached)); then
  echo "node binaries ${k8s_version}, coredns ${coredns_version} cached in $bin" >&2
  echo "$bin"; exit 0
fi
rm -rf "$bin.tmp"; mkdir -p "$bin.tmp"
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ld=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X $pkg.gitVersion=${k8s_version} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
  ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
echo "building node binaries ${k8s_version}, coredns ${coredns_version} into $bin (first build: 5-15 min)" >&2
start=$SECONDS
(cd "$here/pause" && go build -trimpath -ldflags "-s -w" -o "$bin.tmp/pause" .)
(cd "$here/k8s" && for c in kube-scheduler kube-proxy kubelet; do
  t=$SECONDS
  go build -trimpath -ldflags "-s -w $ld" -o "$bin.tmp/$c" "k8s.io/kubernetes/cmd/$c"
  echo "  go build $c: $((SECONDS - t))s" >&2
done)
t=$SECONDS
(cd "$here/coredns" && go build -trimpath -ldflags "-s -w" -o "$bin.tmp/coredns" .)  # the plugins the node uses
echo "  go build coredns: $((SECONDS - t))s" >&2
rm -rf "$bin"; mv "$bin.tmp" "$bin"
echo "built in $((SECONDS - start))s" >&2
echo "$bin"
