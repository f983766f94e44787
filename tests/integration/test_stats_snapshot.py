"""The figures a DatabaseProfile exports, read from a real server; pg_stat_statements only when asked."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgscale.pg import stats

pytestmark = pytest.mark.postgres


def test_statement_times_are_read_only_when_wanted(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute('SELECT count(*) FROM "Task"')
        wanted = stats.snapshot(conn)
        assert wanted.statements_mean_seconds is not None and wanted.slowest_mean_seconds is not None
        skipped = stats.snapshot(conn, statements=False)  # monitoring.statements: false
        assert skipped.statements_mean_seconds is None and skipped.slowest_mean_seconds is None
        assert skipped.connections and wanted.memory_settings["max_connections"]
