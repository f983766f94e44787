#!/usr/bin/env bash
# The whole test suite on a fresh machine: setup, static checks, then pytest
# (unit tests, and integration/e2e tests against a real kube-apiserver,
# PostgreSQL, PgBouncer and S3 server on loopback) on Debian's PostgreSQL 15, then the
# PostgreSQL version matrix (hack/pgmatrix.py: the integration and e2e tiers on 17, the core
# areas on 14, 16 and 18, servers from hack/postgres-versions.txt) and its table.
# Extra arguments go to the first pytest run and skip the matrix (PGSCALE_MATRIX=1 runs it
# anyway, PGSCALE_MATRIX=0 never).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
hack/setup.sh
echo "== static checks" >&2
uv run --frozen ruff check operator tests hack bench
uv run --frozen ruff format --check operator tests hack bench
uv run --frozen mypy
uv run --frozen pgscale crds --check crds
matrix=.tmp/matrix # JUnit XML of every run, for the version table
rm -rf "$matrix"
mkdir -p "$matrix"
if (($#)); then default=0; else default=1; fi
status=0
echo "== pytest on PostgreSQL 15 (Debian's)" >&2
uv run --frozen pytest --junitxml="$matrix/pg15.xml" "$@" || status=$?
if [[ "${PGSCALE_MATRIX:-$default}" == 1 ]]; then
  uv run --frozen python hack/pgmatrix.py all "$matrix" || status=$?
fi
exit "$status"
