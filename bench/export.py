"""Benchmark: RetentionPolicy action export vs a plain `COPY ... TO STDOUT` piped to the same bucket.

Tasks (the sample schema, as bench/retention.py seeds them: two years, about two thirds
completed) in a fresh database; the rows older than 90 days and COMPLETED go:

- copy: `COPY (SELECT * FROM "Task" WHERE <the policy's predicate>) TO STDOUT` streamed into one
  multipart upload to the S3 server (moto) as it arrives: the floor of any export. Nothing
  is verified and nothing is deleted.
- copy-delete: `COPY (DELETE ... WHERE <predicate> RETURNING *) TO STDOUT` the same way, in one
  transaction (rolled back afterwards, so pgscale finds the same rows): a script that also
  removes the rows, verifying nothing.
- pgscale: `pgscale job retention`'s run with `action: export` (`--rows-per-file`): batches
  locked, written as Parquet (zstd), uploaded create-only, read back, then deleted, with the
  ledger and run log in the same transaction.

Each contender runs in its own process (peak memory is its own max RSS) on the same data,
one stream each (the same concurrency); pgscale last, since it deletes the rows. A
contender's clock starts after its imports (reported apart as import_seconds: a run pays
them once, whatever the table's size). Rates
are rows/s and MB/s of the rows' size in the database (the same bytes for both). pgscale
then runs again on a table twice as large: its peak memory should stay flat.

    uv run python bench/export.py --rows 400000 --rows-per-file 50000 --out bench/results/export.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localenv  # noqa: E402

from common import run_child  # noqa: E402

MiB = 1024 * 1024
PREDICATE = """status = 'COMPLETED' AND "completedAt" < now() - interval '90 days'"""
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def seed(dsn: str, n: int) -> tuple[int, int]:
    """n tasks; returns (matching rows, their bytes in the database)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        conn.execute(
            """INSERT INTO "Task" (title, status, "userId", "createdAt", "completedAt")
               SELECT 'task ' || g || ' ' || md5(g::text), CASE WHEN g %% 3 = 0 THEN 'PENDING' ELSE 'COMPLETED' END,
                      g %% 50, now() - (g * (730.0 / %(n)s) || ' days')::interval,
                      CASE WHEN g %% 3 = 0 THEN NULL
                           ELSE now() - (g * (730.0 / %(n)s) || ' days')::interval + interval '1 hour' END
               FROM generate_series(1, %(n)s) g""",
            {"n": n},
        )
        conn.execute('VACUUM ANALYZE "Task"')
        row = conn.execute(f'SELECT count(*), sum(pg_column_size(t.*)) FROM "Task" t WHERE {PREDICATE}').fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def client(endpoint: str) -> Any:
    from pgscale.storage import s3_client

    return s3_client(endpoint, "us-east-1", "bench", "bench", True)


def run_copy(dsn: dict[str, Any], endpoint: str, bucket: str, rows_per_file: int) -> dict[str, Any]:
    """COPY's text, streamed into one multipart upload."""
    from pgscale.storage import S3Store

    store = S3Store(client(endpoint), bucket, "copy/")
    sent = [0]

    def chunks() -> Any:
        with (
            psycopg.connect(**dsn) as conn,
            conn.cursor().copy(f'COPY (SELECT * FROM "Task" WHERE {PREDICATE}) TO STDOUT') as copy,
        ):
            for block in copy:
                sent[0] += len(block)
                yield bytes(block)

    store.put_new("Task.tsv", chunks(), size=store.multipart_threshold, sha256="-", content_type=None)
    return {"bytes_written": sent[0]}


def run_copy_delete(dsn: dict[str, Any], endpoint: str, bucket: str, rows_per_file: int) -> dict[str, Any]:
    """`COPY (DELETE ... RETURNING *) TO STDOUT` into one upload, in one transaction: what a script that
    also removes the rows does (nothing verified). Rolled back, so pgscale gets the same rows."""
    from pgscale.storage import S3Store

    store = S3Store(client(endpoint), bucket, "copy-delete/")
    sent = [0]
    with psycopg.connect(**dsn) as conn:

        def chunks() -> Any:
            with conn.cursor().copy(f'COPY (DELETE FROM "Task" WHERE {PREDICATE} RETURNING *) TO STDOUT') as copy:
                for block in copy:
                    sent[0] += len(block)
                    yield bytes(block)

        store.put_new("Task.tsv", chunks(), size=store.multipart_threshold, sha256="-", content_type=None)
        conn.rollback()
    return {"bytes_written": sent[0]}


def run_pgscale(dsn: dict[str, Any], endpoint: str, bucket: str, rows_per_file: int) -> dict[str, Any]:
    from pgscale.api.retentionpolicy import RetentionPolicySpec
    from pgscale.jobs import JobInput
    from pgscale.jobs.retention import run
    from pgscale.pg.connection import ConnInfo
    from pgscale.storage import open_store

    spec = {
        "profileRef": {"name": "app"},
        "table": {"name": "Task"},
        "ageColumn": "completedAt",
        "olderThan": "90d",
        "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
        "action": "export",
        "export": {
            "destination": {"s3": {"bucket": bucket, "prefix": "pgscale/", "endpoint": endpoint}},
            "rowsPerFile": rows_per_file,
        },
        "children": {"mode": "archive"},
    }
    store = open_store(RetentionPolicySpec.model_validate(spec).export_or_default.destination, KEYS)
    report = run(JobInput("bench", "export", spec, "pgscale", ConnInfo(**dsn)), store=store)
    assert report.outcome == "Succeeded", report.message
    return {"rows": report.rows_archived, "files": report.files, "bytes_written": report.bytes_written}


CONTENDERS = {"copy": run_copy, "copy-delete": run_copy_delete, "pgscale": run_pgscale}


# What each contender imports, loaded before its clock starts: a process's start is paid once per run
# (a Job's pod), not per row, and pgscale's (pyarrow, pydantic) would otherwise weigh on small tables.
IMPORTS = {
    "copy": ("pgscale.storage",),
    "copy-delete": ("pgscale.storage",),
    "pgscale": ("pgscale.storage", "pgscale.jobs.retention", "pgscale.jobs.export", "pgscale.export"),
}


def child(args: argparse.Namespace) -> int:
    import importlib

    dsn = json.loads(args.dsn)
    begun = time.monotonic()
    for module in IMPORTS[args.child]:
        importlib.import_module(module)
    started = time.monotonic()
    result = CONTENDERS[args.child](dsn, args.endpoint, args.bucket, args.rows_per_file)
    result["seconds"] = round(time.monotonic() - started, 3)
    result["import_seconds"] = round(started - begun, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


def measure(contender: str, pg: localenv.Postgres, db: str, endpoint: str, rows_per_file: int) -> dict[str, Any]:
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client(endpoint).create_bucket(Bucket=bucket)
    dsn = {"host": pg.host, "port": pg.port, "dbname": db, "user": "postgres", "password": pg.PASSWORD}
    return run_child(__file__, contender, dsn, endpoint, bucket, "--rows-per-file", str(rows_per_file))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=400000, help="tasks in the table (the second run: twice as many)")
    p.add_argument("--rows-per-file", type=int, default=50000, help="the policy's export.rowsPerFile")
    p.add_argument("--out")
    p.add_argument("--child", choices=list(CONTENDERS))
    p.add_argument("--dsn")
    p.add_argument("--endpoint")
    p.add_argument("--bucket")
    args = p.parse_args()
    if args.child:
        return child(args)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pgscale-bench-") as tmp:
        pg = localenv.Postgres(Path(tmp)).start()
        s3 = localenv.S3Server(Path(tmp)).start()
        try:
            for label, n in (("main", args.rows), ("double", args.rows * 2)):
                db = f"bench_{label}"
                pg.execute(f'CREATE DATABASE "{db}"')
                rows, size = seed(pg.dsn(db), n)
                for name in ("copy", "copy-delete", "pgscale") if label == "main" else ("pgscale",):
                    r = measure(name, pg, db, s3.endpoint, args.rows_per_file)
                    r.update(
                        table_rows=n,
                        matching_rows=rows,
                        database_mb=round(size / MiB, 1),
                        rows_per_second=round(rows / r["seconds"]),
                        mb_per_second=round(size / MiB / r["seconds"], 2),
                    )
                    results[f"{name}@{n}"] = r
                    print(
                        f"{name:8} {n:8} tasks {rows:8} rows {size / MiB:7.1f} MB  {r['seconds']:7.2f} s  "
                        f"{r['rows_per_second']:8} rows/s {r['mb_per_second']:6.2f} MB/s  "
                        f"peak RSS {r['peak_rss_mb']:6.1f} MB",
                        flush=True,
                    )
                pg.execute(f'DROP DATABASE "{db}"')
        finally:
            s3.stop()
            pg.stop()
    n = args.rows
    ours, copy, moved = results[f"pgscale@{n}"], results[f"copy@{n}"], results[f"copy-delete@{n}"]
    ratios = {
        "throughput pgscale/copy (rows/s)": round(ours["rows_per_second"] / copy["rows_per_second"], 3),
        "throughput pgscale/copy (MB/s)": round(ours["mb_per_second"] / copy["mb_per_second"], 3),
        "throughput pgscale/copy-delete (rows/s)": round(ours["rows_per_second"] / moved["rows_per_second"], 3),
        "bytes written pgscale (Parquet) / copy (text)": round(ours["bytes_written"] / copy["bytes_written"], 3),
        "peak memory pgscale at 2x table / 1x table": round(
            results[f"pgscale@{2 * n}"]["peak_rss_mb"] / ours["peak_rss_mb"], 3
        ),
    }
    for k, v in ratios.items():
        print(f"{k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
