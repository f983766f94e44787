"""Statistics a DatabaseProfile reports: connections, sizes, index use, statements, replication.

One snapshot per reconcile; every query is read-only and cheap (catalog and
pg_stat_* views). pg_stat_statements is used only when it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import ensure_state_table

TOP_TABLES = 20


@dataclass
class TableStats:
    name: str  # schema.table
    bytes: int
    seq_scan: int
    idx_scan: int
    dead_tuples: int
    live_tuples: int


@dataclass
class Snapshot:
    """What the server looks like now."""

    connections: dict[str, int] = field(default_factory=dict)  # state -> count (all databases)
    max_connections: int = 0
    database_bytes: int = 0
    tables: list[TableStats] = field(default_factory=list)
    unused_indexes: list[str] = field(default_factory=list)
    statements_mean_seconds: float | None = None  # over all statements; None without pg_stat_statements
    slowest_mean_seconds: float | None = None
    replication: dict[str, tuple[int | None, float | None]] = field(default_factory=dict)  # name -> (bytes, s)
    memory_settings: dict[str, str] = field(default_factory=dict)  # running values the memory estimate needs


def snapshot(conn: psycopg.Connection, *, statements: bool = True) -> Snapshot:
    """The database's figures for metrics and alerts; `statements`: read pg_stat_statements when installed."""
    snap = Snapshot()
    snap.connections = {
        str(r[0]): int(r[1])
        for r in conn.execute(
            "SELECT coalesce(state, 'background'), count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' GROUP BY 1"
        ).fetchall()
    }
    row = conn.execute(
        "SELECT current_setting('max_connections')::int, pg_database_size(current_database())"
    ).fetchone()
    assert row is not None
    snap.max_connections, snap.database_bytes = int(row[0]), int(row[1] or 0)
    # A table dropped while this runs (pgscale's own conversion cleanup does it) has no size: it is
    # left out, not an int(None) that would stall every profile on the database.
    snap.tables = [
        TableStats(str(r[0]), int(r[1]), int(r[2] or 0), int(r[3] or 0), int(r[4] or 0), int(r[5] or 0))
        for r in conn.execute(
            "SELECT * FROM (SELECT schemaname || '.' || relname, pg_total_relation_size(relid) AS size, seq_scan, "
            "idx_scan, n_dead_tup, n_live_tup FROM pg_stat_user_tables) t WHERE size IS NOT NULL "
            "ORDER BY size DESC LIMIT %s",
            (TOP_TABLES,),
        ).fetchall()
        if r[1] is not None
    ]
    snap.unused_indexes = [
        str(r[0])
        for r in conn.execute(
            "SELECT s.schemaname || '.' || s.indexrelname FROM pg_stat_user_indexes s "
            "JOIN pg_index i ON i.indexrelid = s.indexrelid "
            "WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary ORDER BY 1 LIMIT 50"
        ).fetchall()
    ]
    if statements and _has_statements(conn):
        row = conn.execute(
            "SELECT sum(total_exec_time) / nullif(sum(calls), 0) / 1000, max(mean_exec_time) / 1000 "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        if row is not None:
            snap.statements_mean_seconds = float(row[0]) if row[0] is not None else 0.0
            snap.slowest_mean_seconds = float(row[1]) if row[1] is not None else 0.0
    snap.memory_settings = {
        str(r[0]): str(r[1])
        for r in conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
            (
                [
                    "shared_buffers",
                    "max_connections",
                    "work_mem",
                    "maintenance_work_mem",
                    "autovacuum_work_mem",
                    "autovacuum_max_workers",
                    "wal_buffers",
                ],
            ),
        ).fetchall()
    }
    for name, lag_bytes, lag_seconds in conn.execute(
        "SELECT coalesce(application_name, client_addr::text, pid::text), "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, extract(epoch FROM replay_lag) "
        "FROM pg_stat_replication"
    ).fetchall():
        snap.replication[str(name)] = (
            int(lag_bytes) if lag_bytes is not None else None,
            float(lag_seconds) if lag_seconds is not None else None,
        )
    return snap


def _has_statements(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()
    return row is not None


# --- size samples for capacity projection ------------------------------------------------

SAMPLES = "size_samples"


def ensure_samples(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(
        conn,
        state_schema,
        SAMPLES,
        "profile text NOT NULL, sampled_at timestamptz NOT NULL, object text NOT NULL, bytes bigint NOT NULL, "
        "PRIMARY KEY (profile, object, sampled_at)",
    )


def record_sample(conn: psycopg.Connection, state_schema: str, profile: str, sizes: dict[str, int]) -> None:
    """One sample: '' is the whole database, other keys are tables."""
    table = sql.SQL("{}.{}").format(sql.Identifier(state_schema), sql.Identifier(SAMPLES))
    with conn.transaction():
        for obj, size in sizes.items():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (profile, sampled_at, object, bytes) VALUES (%s, now(), %s, %s) "
                    "ON CONFLICT DO NOTHING"
                ).format(table),
                (profile, obj, size),
            )
        # Keep about two years of history; older samples no longer change a projection.
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE profile = %s AND sampled_at < now() - interval '800 days'").format(table),
            (profile,),
        )


def last_sample_age_seconds(conn: psycopg.Connection, state_schema: str, profile: str) -> float | None:
    row = conn.execute(
        sql.SQL("SELECT extract(epoch FROM now() - max(sampled_at)) FROM {}.{} WHERE profile = %s").format(
            sql.Identifier(state_schema), sql.Identifier(SAMPLES)
        ),
        (profile,),
    ).fetchone()
    return float(row[0]) if row and row[0] is not None else None


def samples(
    conn: psycopg.Connection, state_schema: str, profile: str, days: int = 90
) -> dict[str, list[tuple[float, int]]]:
    """object -> [(epoch seconds, bytes)] over the last `days`."""
    rows = conn.execute(
        sql.SQL(
            "SELECT object, extract(epoch FROM sampled_at), bytes FROM {}.{} WHERE profile = %s "
            "AND sampled_at > now() - make_interval(days => %s) ORDER BY sampled_at"
        ).format(sql.Identifier(state_schema), sql.Identifier(SAMPLES)),
        (profile, days),
    ).fetchall()
    out: dict[str, list[tuple[float, int]]] = {}
    for obj, at, size in rows:
        out.setdefault(str(obj), []).append((float(at), int(size)))
    return out
