#!/usr/bin/env bash
# pgscale end to end on this machine: a local control plane, a PostgreSQL loaded with
# the strategy's sample application, an S3 server and the operator; applies every
# example and shows each resource reaching its state. Everything stops at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
hack/setup.sh
exec uv run --frozen python hack/demo.py "$@"
