"""DatabaseSplit: the initial copy beside pg_dump | pg_restore, and the cutover's write block at several write rates.

Two PostgreSQL servers (wal_level=logical) on this machine. The copy: pgscale's whole `replicate` step
(checks, tables created on the target, publication, slot, subscription, initial copy until every table
is ready) against `pg_dump -Fc -t '"Message"' | pg_restore` of the same rows. The cutover: a writer
inserts messages at a fixed rate (following the read-only refusal to the other database, as an
application following the Secret would), and the split cuts over; pgscale's measured write block and the
writer's longest stall are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

import localenv  # noqa: E402

from pgscale.api.databasesplit import DatabaseSplitSpec  # noqa: E402
from pgscale.errors import TransientError  # noqa: E402
from pgscale.pg.connection import ConnInfo  # noqa: E402
from pgscale.split import Side, Split, advance, drop_replication, resolve_tables  # noqa: E402

SPEC = {
    "source": {"profileRef": {"name": "monolith"}},
    "target": {"profileRef": {"name": "messages"}},
    "tables": [{"name": "Message"}],
    "crossForeignKeys": "skip",
}


def database(src: localenv.Postgres, dst: localenv.Postgres, rows: int) -> str:
    name = f"b_{uuid.uuid4().hex[:8]}"
    for server in (src, dst):
        server.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(src.dsn(name), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        # Both contenders copy "Message" alone: its key to "Task" cannot be restored without "Task".
        conn.execute('ALTER TABLE "Message" DROP CONSTRAINT "Message_taskId_fkey"')
        conn.execute(
            "INSERT INTO \"Message\" (body) SELECT repeat('message body ', 6) || g FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute('VACUUM ANALYZE "Message"')
    return name


def make_split(src: localenv.Postgres, dst: localenv.Postgres, name: str, conns: tuple[Any, Any]) -> Split:
    def side(server: localenv.Postgres, conn: psycopg.Connection) -> Side:
        info = ConnInfo(host=server.host, port=server.port, dbname=name, user="postgres", password=server.PASSWORD)
        return Side(conn=conn, state_schema="pgscale", replication=info, info=info)

    spec = DatabaseSplitSpec.model_validate(SPEC)
    return Split(
        key=f"bench/{name}",
        spec=spec,
        tables=resolve_tables(conns[0], spec),
        source=side(src, conns[0]),
        target=side(dst, conns[1]),
    )


def drive(split: Split, desired: Any, phase: str, timeout: float = 1800) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            report = advance(split, desired)
        except TransientError:
            time.sleep(0.1)
            continue
        if report.phase == phase and report.done:
            return report
        time.sleep(0.1)
    raise RuntimeError(f"no {phase} within {timeout}s")


def copy_pgscale(src: localenv.Postgres, dst: localenv.Postgres, rows: int) -> dict[str, Any]:
    name = database(src, dst, rows)
    with (
        psycopg.connect(src.dsn(name), autocommit=True) as s,
        psycopg.connect(dst.dsn(name), autocommit=True) as t,
    ):
        split = make_split(src, dst, name, (s, t))
        started = time.monotonic()
        drive(split, "source", "Replicating")
        seconds = time.monotonic() - started
        drop_replication(split)
    return {
        "contender": "pgscale replicate",
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
    }


def copy_dump(src: localenv.Postgres, dst: localenv.Postgres, rows: int) -> dict[str, Any]:
    name = database(src, dst, rows)
    started = time.monotonic()
    dump = subprocess.Popen(
        [str(localenv.PG_BIN / "pg_dump"), "-Fc", "-t", 'public."Message"', "-d", src.uri(name)],
        stdout=subprocess.PIPE,
    )
    subprocess.run(
        [str(localenv.PG_BIN / "pg_restore"), "--no-owner", "-d", dst.uri(name)], stdin=dump.stdout, check=True
    )
    if dump.wait() != 0:
        raise RuntimeError("pg_dump failed")
    seconds = time.monotonic() - started
    return {
        "contender": "pg_dump | pg_restore",
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
    }


class PacedWriter(threading.Thread):
    """Inserts at `rate` per second on whichever database takes writes; its longest stall."""

    def __init__(self, dsns: dict[str, str], rate: int) -> None:
        super().__init__(daemon=True)
        self.dsns, self.rate = dsns, rate
        self.route = "source"
        self.stop = threading.Event()
        self.longest = 0.0
        self.writes = 0
        self.errors = 0

    def run(self) -> None:
        if self.rate <= 0:
            return
        conn = psycopg.connect(self.dsns[self.route], autocommit=True)
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stop.is_set():
            started = time.monotonic()
            while not self.stop.is_set():
                try:
                    conn.execute("INSERT INTO \"Message\" (body) VALUES ('live')")
                    break
                except psycopg.errors.ReadOnlySqlTransaction:
                    self.route = "target" if self.route == "source" else "source"
                    conn.close()
                    conn = psycopg.connect(self.dsns[self.route], autocommit=True)
                except psycopg.Error:
                    self.errors += 1
                    break
            self.longest = max(self.longest, time.monotonic() - started)
            self.writes += 1
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        conn.close()


def cutover(src: localenv.Postgres, dst: localenv.Postgres, rows: int, rate: int) -> dict[str, Any]:
    name = database(src, dst, rows)
    with (
        psycopg.connect(src.dsn(name), autocommit=True) as s,
        psycopg.connect(dst.dsn(name), autocommit=True) as t,
    ):
        split = make_split(src, dst, name, (s, t))
        drive(split, "source", "Replicating")
        writer = PacedWriter({"source": src.dsn(name), "target": dst.dsn(name)}, rate)
        writer.start()
        time.sleep(3)
        report = drive(split, "target", "CutOver")
        time.sleep(2)
        writer.stop.set()
        writer.join(10)
        drop_replication(split)
    assert report.last is not None
    return {
        "writes_per_second": rate,
        "rows": rows,
        "write_block_ms": report.last.write_block_ms,
        "writer_longest_stall_ms": round(writer.longest * 1000, 1),
        "writer_writes": writer.writes,
        "writer_errors": writer.errors,
        "event": "; ".join(e.message for e in report.events),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=500_000, help="messages for the copy")
    p.add_argument("--cutover-rows", type=int, default=50_000, help="messages before each cutover")
    p.add_argument("--rates", default="0,100,1000", help="writes per second during the cutovers")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgscale-bench-") as tmp:
        src = localenv.Postgres(Path(tmp), name="source", wal_level="logical").start()
        dst = localenv.Postgres(Path(tmp), name="target", wal_level="logical").start()
        try:
            for server in (src, dst):
                server.execute("ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'")
                server.execute("SELECT pg_reload_conf()")
            copies = [copy_dump(src, dst, args.rows), copy_pgscale(src, dst, args.rows)]
            cutovers = [cutover(src, dst, args.cutover_rows, int(r)) for r in args.rates.split(",")]
        finally:
            src.stop()
            dst.stop()
    ratio = round(copies[1]["rows_per_second"] / copies[0]["rows_per_second"], 3)
    print(f"\ninitial copy: {args.rows} messages, PostgreSQL {src.major}, two servers on one machine")
    for c in copies:
        print(f"  {c['contender']}: {c['seconds']} s, {c['rows_per_second']} rows/s")
    print(f"  copy rate (pgscale / pg_dump|pg_restore): {ratio}")
    print(f"cutover after {args.cutover_rows} messages:")
    for c in cutovers:
        print(
            f"  {c['writes_per_second']} writes/s: writes blocked {c['write_block_ms']} ms; writer's longest stall "
            f"{c['writer_longest_stall_ms']} ms over {c['writer_writes']} writes, {c['writer_errors']} errors"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"copy": copies, "copy_rate_ratio": ratio, "cutover": cutovers}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
