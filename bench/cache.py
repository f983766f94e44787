"""Benchmark: a Cache's invalidation path, from a writer's UPDATE to the key's deletion in the cache.

On a fresh database with the sample schema and --rows tasks, a real redis-server run with the
config pgscale renders, and the trigger of `invalidate: [{table: Task, keys: [task:{id},
user-tasks:{userId}]}]`:

- relay throughput: --backlog updates written while the relay is stopped, then the time for one
  relay to drain them (invalidations/s, i.e. outbox rows; each update writes 2 keys);
- latency at a paced load (100 and 1000 writes/s by default, one writer thread per 500 writes/s):
  from the trigger, in the writer's transaction just before its commit, to the DEL in the cache,
  p50 and p99 (an upper bound of commit-to-deletion), and the outbox's largest depth;
- the writer's added latency: the same single-row UPDATEs (autocommit) timed without the trigger
  and with it, in alternating blocks; p50/p99 and the ratio with/without.

    uv run python bench/cache.py --out bench/results/cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localenv  # noqa: E402

from common import latency_ms, seed_tasks  # noqa: E402
from pgscale import pg  # noqa: E402
from pgscale.api.cache import CacheSpec, InvalidateRule  # noqa: E402
from pgscale.cache import cache_id, maxmemory, new_password, plan_table  # noqa: E402
from pgscale.pg import cache as sqlc  # noqa: E402
from pgscale.relay import Relay  # noqa: E402
from pgscale.specs import cache as specs  # noqa: E402

DATABASE = "bench_cache"
STATE = "pgscale"
UPDATE = 'UPDATE "Task" SET title = %s, "userId" = %s WHERE id = %s'


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    spec = CacheSpec.model_validate({"profileRef": {"name": "app"}, "memory": "1Gi"})
    password = new_password()
    (tmp / "auth.conf").write_text(specs.auth_config(password))
    port = localenv.free_port()
    config = specs.server_config(
        spec,
        maxmemory_bytes=maxmemory(spec, 1024**3),
        auth_file=str(tmp / "auth.conf"),
        data_dir=str(tmp),
        port=port,
        bind="127.0.0.1",
    )
    (tmp / "cache.conf").write_text(config)
    proc = subprocess.Popen(["redis-server", str(tmp / "cache.conf")], stdout=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start")


def install(conn: psycopg.Connection, name: str) -> str:
    rule = InvalidateRule.model_validate({"table": {"name": "Task"}, "keys": ["task:{id}", "user-tasks:{userId}"]})
    plan = plan_table(rule, 0, list(pg.table_columns(conn, "public", "Task") or {}))
    cid = cache_id("bench", name)
    sqlc.install(conn, state_schema=STATE, cid=cid, plans=[plan])
    return cid


def relay_for(dsn: str, url: str, cid: str, lags: list[float] | None = None) -> Relay:
    return Relay(
        connect=lambda: psycopg.connect(dsn, autocommit=True),
        cache=redis.Redis.from_url(url),
        state_schema=STATE,
        cache_id=cid,
        name="bench/c",
        batch_size=500,
        poll_seconds=1.0,
        on_deleted=lags.extend if lags is not None else None,
    )


def throughput(dsn: str, url: str, rows: int, backlog: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cid = install(conn, "throughput")
        conn.execute(
            'UPDATE "Task" SET title = md5(random()::text) WHERE id IN (SELECT id FROM "Task" ORDER BY id LIMIT %s)',
            (backlog,),
        )
        waiting = sqlc.depth(conn, STATE, cid).rows
        relay = relay_for(dsn, url, cid)
        started = time.monotonic()
        drained = relay.drain()
        seconds = time.monotonic() - started
        sqlc.uninstall(conn, state_schema=STATE, cid=cid)
    assert drained == waiting
    return {
        "outbox_rows": waiting,
        "seconds": round(seconds, 2),
        "invalidations_per_second": round(waiting / seconds),
    }


def paced(dsn: str, url: str, rows: int, rate: int, seconds: float) -> dict[str, Any]:
    lags: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        cid = install(conn, f"paced-{rate}")
        relay = relay_for(dsn, url, cid, lags)
        stop_relay, stop = threading.Event(), threading.Event()
        relay_thread = threading.Thread(target=relay.run, args=(stop_relay,))
        relay_thread.start()
        writers = max(1, rate // 500)
        done = [0] * writers
        depth = [0]

        def write(i: int) -> None:
            interval = writers / rate
            rnd = random.Random(i)
            with psycopg.connect(dsn, autocommit=True) as w:
                next_at = time.monotonic()
                while not stop.is_set():
                    w.execute(UPDATE, (f"t{rnd.random()}", rnd.randrange(500), rnd.randrange(1, rows + 1)))
                    done[i] += 1
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))

        def watch() -> None:
            with psycopg.connect(dsn, autocommit=True) as w:
                while not stop.is_set():
                    depth[0] = max(depth[0], sqlc.depth(w, STATE, cid).rows)
                    time.sleep(0.2)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        threads.append(threading.Thread(target=watch))
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 60
        while sqlc.depth(conn, STATE, cid).rows and time.monotonic() < deadline:
            time.sleep(0.1)
        stop_relay.set()
        relay_thread.join()
        sqlc.uninstall(conn, state_schema=STATE, cid=cid)
    p50, p99, longest = latency_ms(lags)
    return {
        "target_writes_per_second": rate,
        "writes_per_second": round(sum(done) / elapsed),
        "invalidations": len(lags),
        "lag_p50_ms": p50,
        "lag_p99_ms": p99,
        "lag_max_ms": longest,
        "outbox_max_depth": depth[0],
    }


def overhead(dsn: str, rows: int, updates: int, blocks: int = 10) -> dict[str, Any]:
    """The same UPDATEs without and with the trigger, in alternating blocks (drift hits both)."""
    timed: dict[bool, list[float]] = {False: [], True: []}
    rnd = random.Random(1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        cid = cache_id("bench", "overhead")
        plan = None
        for block in range(blocks * 2):
            on = block % 2 == 1
            if on and plan is None:
                install(conn, "overhead")
                plan = True
            elif not on and plan:
                sqlc.uninstall(conn, state_schema=STATE, cid=cid)
                plan = None
            for _ in range(updates // blocks):
                args = (f"t{rnd.random()}", rnd.randrange(500), rnd.randrange(1, rows + 1))
                t0 = time.perf_counter()
                conn.execute(UPDATE, args)
                timed[on].append(time.perf_counter() - t0)
            if on:
                conn.execute(f'TRUNCATE {STATE}."cache_outbox_{cid}"')  # no relay here: keep the outbox small
        if plan:
            sqlc.uninstall(conn, state_schema=STATE, cid=cid)
    without, with_ = latency_ms(timed[False]), latency_ms(timed[True])
    return {
        "updates_each": len(timed[False]),
        "without_trigger_p50_ms": without[0],
        "without_trigger_p99_ms": without[1],
        "with_trigger_p50_ms": with_[0],
        "with_trigger_p99_ms": with_[1],
        "ratio_p50": round(with_[0] / without[0], 2),
        "ratio_p99": round(with_[1] / without[1], 2),
    }


def machine(conn: psycopg.Connection) -> dict[str, Any]:
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "postgresql": str(conn.execute("SHOW server_version").fetchone()[0]),  # type: ignore[index]
        "redis": version,
        "commit": commit,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=100000, help="tasks in the table")
    p.add_argument("--backlog", type=int, default=20000, help="updates waiting for the relay in the throughput run")
    p.add_argument("--rates", default="100,1000", help="paced writes per second, comma-separated")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each paced run")
    p.add_argument("--updates", type=int, default=5000, help="UPDATEs timed with and without the trigger, each")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (hack/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="pgscale-bench-") as tmp:
        work = Path(tmp)
        server = localenv.Postgres(work, name="postgres-bench")
        server.start()
        proc, url = start_redis(work)
        try:
            server.execute(f'CREATE DATABASE "{DATABASE}"')
            dsn = server.dsn(DATABASE)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
                seed_tasks(conn, "Task", args.rows)
                conn.execute('VACUUM ANALYZE "Task"')
                info = machine(conn)
            results: dict[str, Any] = {"overhead": overhead(dsn, args.rows, args.updates)}
            print(f"writer overhead: {results['overhead']}", flush=True)
            results["throughput"] = throughput(dsn, url, args.rows, args.backlog)
            print(f"relay throughput: {results['throughput']}", flush=True)
            for rate in (int(r) for r in args.rates.split(",")):
                results[f"paced_{rate}"] = paced(dsn, url, args.rows, rate, args.seconds)
                print(f"{rate} writes/s: {results[f'paced_{rate}']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
            server.stop()
    report = {"command": " ".join(["uv run python bench/cache.py", *sys.argv[1:]]), "machine": info, **results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
