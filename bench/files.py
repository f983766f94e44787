"""Benchmark: FileMigration vs a naive script vs raw uploads, same files, one run.

Files of mixed sizes (mostly KB, some MB, a few tens of MB) as Base64 in "File".
Each contender runs in its own process (peak memory is its own max RSS) against
the same PostgreSQL and S3-compatible server (moto) on loopback:

- pgscale: `Migration` in phase copy (stream, hash, create-only upload, verify, ledger);
- naive: `SELECT id, data FROM "File"` into memory, decode, upload one at a time;
- raw: the decoded bytes from memory, uploaded at pgscale's concurrency: the upper bound.

It then runs pgscale again on a table twice as large to show that its peak memory
does not grow with the table. Reports MB/s, peak RSS and ratios.

    uv run python bench/files.py --files 2000
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localenv  # noqa: E402

from common import run_child  # noqa: E402

MiB = 1024 * 1024
CONCURRENCY = 4


def sizes(n: int, seed: int = 1) -> list[int]:
    """95% 1 KB-100 KB, 4.5% 1-5 MB, 0.5% 20-40 MB."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.95:
            out.append(rng.randint(1024, 100 * 1024))
        elif roll < 0.995:
            out.append(rng.randint(MiB, 5 * MiB))
        else:
            out.append(rng.randint(20 * MiB, 40 * MiB))
    return out


def seed(dsn: str, n: int) -> int:
    total = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        block = os.urandom(41 * MiB)
        with conn.cursor() as cur:
            for i, size in enumerate(sizes(n)):
                start = (i * 7919) % (len(block) - size)
                data = base64.b64encode(block[start : start + size]).decode()
                cur.execute(
                    'INSERT INTO "File" (id, "fileName", size, data) VALUES (%s, %s, %s, %s)',
                    (f"f{i:05d}", f"f{i}.bin", size, data),
                )
                total += size
        conn.execute('VACUUM ANALYZE "File"')
    return total


def client(endpoint: str) -> Any:
    from pgscale.storage import s3_client

    return s3_client(endpoint, "us-east-1", "bench", "bench", True, max_pool=CONCURRENCY * 2)


# --- contenders (each runs in a child process) ---------------------------------------


def run_pgscale(dsn: dict[str, Any], endpoint: str, bucket: str) -> dict[str, Any]:
    from pgscale.api.filemigration import FileMigrationSpec
    from pgscale.jobs import JobInput
    from pgscale.jobs.files import Migration, make_store
    from pgscale.pg.connection import ConnInfo

    spec = {
        "profileRef": {"name": "app"},
        "table": {"name": "File"},
        "keyColumn": "id",
        "dataColumn": "data",
        "encoding": "base64",
        "destination": {"s3": {"bucket": bucket, "endpoint": endpoint}},
        "batchSize": 100,
        "concurrency": CONCURRENCY,
    }
    store = make_store(
        FileMigrationSpec.model_validate(spec), {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    )
    migration = Migration(JobInput("bench", "files", spec, "pgscale", ConnInfo(**dsn)), store)
    started = time.monotonic()
    report = migration.run()
    return {"rows": report.rows_migrated, "failed": report.rows_failed, "upload_seconds": time.monotonic() - started}


def run_naive(dsn: dict[str, Any], endpoint: str, bucket: str) -> dict[str, Any]:
    s3 = client(endpoint)
    started = time.monotonic()
    with psycopg.connect(**dsn) as conn:
        rows = conn.execute('SELECT id, data FROM "File"').fetchall()  # the whole table in memory
    for key, data in rows:
        s3.put_object(Bucket=bucket, Key=f"naive/{key}", Body=base64.b64decode(data))
    return {"rows": len(rows), "upload_seconds": time.monotonic() - started}


def run_raw(dsn: dict[str, Any], endpoint: str, bucket: str) -> dict[str, Any]:
    """The same bytes, already decoded in memory (loaded before the clock starts)."""
    from pgscale.storage import S3Store

    with psycopg.connect(**dsn) as conn:
        files = [(k, base64.b64decode(d)) for k, d in conn.execute('SELECT id, data FROM "File"').fetchall()]
    store = S3Store(client(endpoint), bucket, "raw/")
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda f: store.put_new(f[0], [f[1]], size=len(f[1]), sha256="-", content_type=None), files))
    return {"rows": len(files), "upload_seconds": time.monotonic() - started}


CONTENDERS = {"pgscale": run_pgscale, "naive": run_naive, "raw": run_raw}


def child(args: argparse.Namespace) -> int:
    dsn = json.loads(args.dsn)
    started = time.monotonic()
    result = CONTENDERS[args.contender](dsn, args.endpoint, args.bucket)
    result["seconds"] = result.pop("upload_seconds", time.monotonic() - started)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))
    return 0


def measure(contender: str, pg: localenv.Postgres, db: str, endpoint: str) -> dict[str, Any]:
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client(endpoint).create_bucket(Bucket=bucket)
    dsn = {"host": pg.host, "port": pg.port, "dbname": db, "user": "postgres", "password": pg.PASSWORD}
    return run_child(__file__, contender, dsn, endpoint, bucket)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--out")
    p.add_argument("--child", choices=list(CONTENDERS))
    p.add_argument("--dsn")
    p.add_argument("--endpoint")
    p.add_argument("--bucket")
    args = p.parse_args()
    if args.child:
        args.contender = args.child
        return child(args)
    with tempfile.TemporaryDirectory(prefix="pgscale-bench-") as tmp:
        pg = localenv.Postgres(Path(tmp)).start()
        s3 = localenv.S3Server(Path(tmp)).start()
        try:
            results: dict[str, Any] = {}
            for label, n in (("main", args.files), ("double", args.files * 2)):
                db = f"bench_{label}"
                pg.execute(f'CREATE DATABASE "{db}"')
                total = seed(pg.dsn(db), n)
                contenders = ("raw", "naive", "pgscale") if label == "main" else ("naive", "pgscale")
                for name in contenders:
                    r = measure(name, pg, db, s3.endpoint)
                    r["mb_per_second"] = round(total / MiB / r["seconds"], 1)
                    results[f"{name}@{n}"] = {**r, "files": n, "mb": round(total / MiB, 1)}
                    line = f"{name:8} {n:6} files {total / MiB:8.1f} MB  {r['seconds']:7.2f} s  "
                    print(line + f"{r['mb_per_second']:7.1f} MB/s  peak RSS {r['peak_rss_mb']:7.1f} MB", flush=True)
                pg.execute(f'DROP DATABASE "{db}"')
        finally:
            s3.stop()
            pg.stop()
    n = args.files
    ours, naive, raw = results[f"pgscale@{n}"], results[f"naive@{n}"], results[f"raw@{n}"]
    ratios = {
        "throughput pgscale/naive": round(ours["mb_per_second"] / naive["mb_per_second"], 3),
        "throughput pgscale/raw upload": round(ours["mb_per_second"] / raw["mb_per_second"], 3),
        "peak memory pgscale/naive": round(ours["peak_rss_mb"] / naive["peak_rss_mb"], 3),
        "peak memory pgscale at 2x table / 1x table": round(
            results[f"pgscale@{2 * n}"]["peak_rss_mb"] / ours["peak_rss_mb"], 3
        ),
        "peak memory naive at 2x table / 1x table": round(
            results[f"naive@{2 * n}"]["peak_rss_mb"] / naive["peak_rss_mb"], 3
        ),
    }
    for k, v in ratios.items():
        print(f"{k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
