"""Benchmark: RetentionPolicy's job vs the strategy's archive_old_tasks(), same data, one run.

For each contender: a fresh database with the sample schema and --rows tasks (about
two thirds completed, spread over two years), a concurrent writer that updates,
flips and inserts tasks and times every statement, then the archive run. Reports
throughput (rows/s), the writer's p50/p99 latency and longest stall, rows lost,
and pgscale/strategy ratios.

    uv run python bench/retention.py --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localenv  # noqa: E402

from common import latency_ms, seed_tasks  # noqa: E402
from pgscale.jobs import JobInput  # noqa: E402
from pgscale.jobs.retention import run  # noqa: E402
from pgscale.pg.connection import ConnInfo  # noqa: E402

STRATEGY = """
CREATE OR REPLACE FUNCTION archive_old_tasks() RETURNS void AS $$
BEGIN
  INSERT INTO task_archive SELECT * FROM "Task"
  WHERE status = 'COMPLETED' AND "completedAt" < NOW() - INTERVAL '90 days';
  DELETE FROM "Task"
  WHERE status = 'COMPLETED' AND "completedAt" < NOW() - INTERVAL '90 days';
END;
$$ LANGUAGE plpgsql;
"""
PREDICATE = """status = 'COMPLETED' AND "completedAt" < now() - interval '90 days'"""


@dataclass
class Result:
    contender: str
    rows_matched: int
    rows_moved: int
    seconds: float
    rows_per_second: float
    writer_ops: int
    writer_p50_ms: float
    writer_p99_ms: float
    writer_max_stall_ms: float
    rows_lost: int
    rows_duplicated: int
    extra: dict[str, Any] = field(default_factory=dict)


class Writer(threading.Thread):
    """The application during the run: timed single-row statements, as fast as they go."""

    def __init__(self, dsn: str, max_id: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.max_id = dsn, max_id
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.rng = random.Random(42)

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 3600
            while not self.stop.is_set() and time.monotonic() < deadline:
                op = self.rng.randrange(4)
                started = time.perf_counter()
                if op == 3:
                    conn.execute("""INSERT INTO "Task" (title, status) VALUES ('new', 'PENDING')""")
                else:
                    conn.execute(
                        [
                            """UPDATE "Task" SET title = title || '.' WHERE id = %s""",
                            """UPDATE "Task" SET status = 'PENDING', "completedAt" = NULL WHERE id = %s""",
                            """UPDATE "Task" SET "userId" = "userId" + 1 WHERE id = %s""",
                        ][op],
                        (self.rng.randint(1, self.max_id),),
                    )
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.002)


def seed(pg: localenv.Postgres, name: str, rows: int) -> str:
    pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    pg.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(pg.dsn(name), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        seed_tasks(conn, "Task", rows)
        conn.execute('VACUUM ANALYZE "Task"')
    return pg.dsn(name)


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


def measure(name: str, pg: localenv.Postgres, rows: int, action: Any) -> Result:
    dsn = seed(pg, f"bench_{name}", rows)
    matched = count(dsn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}')
    writer = Writer(dsn, rows)
    writer.start()
    time.sleep(1.0)  # the writer's latency before the run is part of the picture
    started = time.monotonic()
    extra = action(dsn, f"bench_{name}")
    seconds = time.monotonic() - started
    time.sleep(0.5)
    writer.stop.set()
    writer.join()
    archive = "task_archive" if name == "strategy" else '"Task_archive"'
    moved = count(dsn, f"SELECT count(*) FROM {archive}")
    # Every id ever issued must be in exactly one of the two tables.
    ids = f"""FROM generate_series(1, (SELECT last_value FROM pg_sequences WHERE sequencename = 'Task_id_seq')) g(id)
              LEFT JOIN "Task" t ON t.id = g.id LEFT JOIN {archive} a ON a.id = g.id"""
    lost = count(dsn, f"SELECT count(*) {ids} WHERE t.id IS NULL AND a.id IS NULL")
    duplicated = count(dsn, f"SELECT count(*) {ids} WHERE t.id IS NOT NULL AND a.id IS NOT NULL")
    p50, p99, longest = latency_ms(writer.latencies)
    return Result(
        contender=name,
        rows_matched=matched,
        rows_moved=moved,
        seconds=round(seconds, 2),
        rows_per_second=round(moved / seconds, 1),
        writer_ops=len(writer.latencies),
        writer_p50_ms=p50,
        writer_p99_ms=p99,
        writer_max_stall_ms=longest,
        rows_lost=lost,
        rows_duplicated=duplicated,
        extra=extra or {},
    )


def run_pgscale(pg: localenv.Postgres, batch: int) -> Any:
    def action(dsn: str, db: str) -> dict[str, Any]:
        spec = {"profileRef": {"name": "app"}, "table": {"name": "Task"}, "ageColumn": "completedAt",
                "olderThan": "90d", "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
                "batchSize": batch, "maxRunTime": "2h", "statementTimeout": "5m",
                "children": {"mode": "archive"}}  # fmt: skip
        conn = ConnInfo(host=pg.host, port=pg.port, dbname=db, user="postgres", password=pg.PASSWORD)
        report = run(JobInput("bench", "retention", spec, "pgscale", conn))
        assert report.outcome == "Succeeded", report
        return {"batches": report.batches, "batch_size": batch}

    return action


def run_strategy(dsn: str, db: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE TABLE task_archive (LIKE "Task" INCLUDING DEFAULTS)')
        conn.execute(STRATEGY)
        conn.execute("SELECT archive_old_tasks()")
    return {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=1000, help="pgscale batchSize")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgscale-bench-") as tmp:
        pg = localenv.Postgres(Path(tmp)).start()
        try:
            results = [
                measure("strategy", pg, args.rows, run_strategy),
                measure("pgscale", pg, args.rows, run_pgscale(pg, args.batch)),
            ]
        finally:
            pg.stop()
    strategy, ours = results
    ratios = {
        "throughput (pgscale/strategy)": round(ours.rows_per_second / strategy.rows_per_second, 3),
        "writer p99 (pgscale/strategy)": round(ours.writer_p99_ms / strategy.writer_p99_ms, 3),
        "writer longest stall (pgscale/strategy)": round(ours.writer_max_stall_ms / strategy.writer_max_stall_ms, 4),
    }
    cols = ["contender", "rows_moved", "seconds", "rows_per_second", "writer_ops", "writer_p50_ms",
            "writer_p99_ms", "writer_max_stall_ms", "rows_lost", "rows_duplicated"]  # fmt: skip
    print(f"\nretention benchmark: {args.rows} tasks, PostgreSQL 15, one concurrent writer, batchSize {args.batch}")
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(getattr(r, c)) for c in cols))
    for name, value in ratios.items():
        print(f"{name}: {value}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": [asdict(r) for r in results], "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
