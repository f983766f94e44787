#!/usr/bin/env bash
# The whole test suite on a fresh machine: setup, static checks, then pytest
# (unit tests, and integration/e2e tests against a real kube-apiserver,
# PostgreSQL, PgBouncer and S3 server on loopback). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
hack/setup.sh
echo "== static checks" >&2
uv run --frozen ruff check operator tests hack bench
uv run --frozen ruff format --check operator tests hack bench
uv run --frozen mypy
uv run --frozen pgscale crds --check crds
echo "== pytest" >&2
exec uv run --frozen pytest "$@"
