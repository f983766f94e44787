"""What the benchmarks share: the task rows they start from, and how a writer's latencies are summed up."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

import psycopg
from psycopg import sql


def seed_tasks(conn: psycopg.Connection, table: str, rows: int) -> None:
    """`rows` tasks spread over two years, a third pending, the rest completed an hour after creation."""
    conn.execute(
        sql.SQL(
            """INSERT INTO {} (title, status, "userId", "createdAt", "completedAt")
               SELECT 'task ' || g, CASE WHEN g %% 3 = 0 THEN 'PENDING' ELSE 'COMPLETED' END, g %% 500,
                      now() - (g * (730.0 / %(n)s) || ' days')::interval,
                      CASE WHEN g %% 3 = 0 THEN NULL
                           ELSE now() - (g * (730.0 / %(n)s) || ' days')::interval + interval '1 hour' END
               FROM generate_series(1, %(n)s) g"""
        ).format(sql.Identifier(table)),
        {"n": rows},
    )


def latency_ms(latencies: list[float]) -> tuple[float, float, float]:
    """(p50, p99, longest) of a writer's statement times, in milliseconds."""
    lat = sorted(latencies)
    return (
        round(statistics.median(lat) * 1000, 2),
        round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
        round(lat[-1] * 1000, 1),
    )


def run_child(
    script: str, contender: str, dsn: dict[str, Any], endpoint: str, bucket: str, *extra: str
) -> dict[str, Any]:
    """Run one contender in a fresh Python process (its own peak RSS) and return the JSON line it prints last."""
    args = ["--child", contender, "--dsn", json.dumps(dsn), "--endpoint", endpoint, "--bucket", bucket, *extra]
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))
