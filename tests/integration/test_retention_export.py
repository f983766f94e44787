"""RetentionPolicy action export against a real PostgreSQL and a real S3 server (moto) or a volume:
rows leave as Parquet files that DuckDB reads back, come back with `restore`, and a killed run
leaves every row in the table or in exactly one verified file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from localenv import free_port

from conftest import s3_user, scalar, seed_tasks
from pgscale import archive, parquet
from pgscale.api.retentionpolicy import RetentionPolicySpec
from pgscale.jobs import JobInput
from pgscale.jobs.retention import run
from pgscale.pg.connection import ConnInfo
from pgscale.storage import FilesystemStore, ObjectStore, open_store, s3_client

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

PREDICATE = """status = 'COMPLETED' AND "completedAt" < now() - interval '90 days'"""


def spec_s3(s3: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "profileRef": {"name": "app"},
        "table": {"name": "Task"},
        "ageColumn": "completedAt",
        "olderThan": "90d",
        "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
        "action": "export",
        "export": {
            "destination": {"s3": {"bucket": bucket, "prefix": "cold/", "endpoint": s3.endpoint}},
            "rowsPerFile": 500,
        },
        "children": {"mode": "archive"},
        **extra,
    }


def s3_env(s3: Any) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3.SECRET_KEY}


def store_for(spec: dict[str, Any], env: dict[str, str]) -> ObjectStore:
    return open_store(RetentionPolicySpec.model_validate(spec).export_or_default.destination, env)


def conninfo(postgres: Any, database: str) -> ConnInfo:
    return ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )


def job_for(postgres: Any, database: str, spec: dict[str, Any]) -> JobInput:
    return JobInput("ns", "export-tasks", spec, "pgscale", conninfo(postgres, database))


@pytest.fixture
def bucket(s3_server: Any) -> str:
    name = f"cold-{uuid.uuid4().hex[:8]}"
    s3_client(s3_server.endpoint, "us-east-1", s3_server.ACCESS_KEY, s3_server.SECRET_KEY, True).create_bucket(
        Bucket=name
    )
    return name


@pytest.fixture
def conn(postgres: Any, database: str) -> Any:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        yield c


def seed_messages(conn: psycopg.Connection) -> None:
    """Two messages per task, referencing it with ON DELETE CASCADE (the relationships issue's case)."""
    conn.execute('ALTER TABLE "Message" DROP CONSTRAINT "Message_taskId_fkey"')
    conn.execute(
        'ALTER TABLE "Message" ADD CONSTRAINT "Message_taskId_fkey" FOREIGN KEY ("taskId") '
        'REFERENCES "Task" (id) ON DELETE CASCADE'
    )
    conn.execute(
        """INSERT INTO "Message" ("taskId", body, "createdAt")
           SELECT id, 'message ' || n || ' of ' || id, "createdAt" FROM "Task", generate_series(1, 2) n"""
    )


def digest(conn: psycopg.Connection, where: str) -> tuple[int, int, str]:
    """(rows, sum of ids, md5 of id|title|status|completedAt-in-microseconds by id) in PostgreSQL."""
    row = conn.execute(
        f"""SELECT count(*), coalesce(sum(id), 0), md5(coalesce(string_agg(id || '|' || title || '|' || status || '|'
            || (extract(epoch FROM "completedAt") * 1000000)::bigint, ',' ORDER BY id), ''))
            FROM "Task" WHERE {where}"""
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), row[2]


def duck_digest(paths: list[str]) -> tuple[int, int, str]:
    """The same digest, computed by DuckDB over the Parquet files."""
    files = ", ".join(f"'{p}'" for p in paths)
    row = (
        duckdb.connect()
        .execute(
            f"""SELECT count(*), coalesce(sum(id), 0), md5(coalesce(string_agg(id::varchar || '|' || title || '|' ||
            status || '|' || epoch_us("completedAt")::varchar, ',' ORDER BY id), ''))
            FROM read_parquet([{files}])"""
        )
        .fetchone()
    )
    assert row is not None
    return int(row[0]), int(row[1]), row[2]


def download(store: ObjectStore, keys: list[str], into: Path) -> list[str]:
    out = []
    for key in keys:
        path = into / key.replace("/", "_")
        path.write_bytes(store.fetch(key))
        out.append(str(path))
    return out


def rows_by_id(conn: psycopg.Connection) -> tuple[dict[int, tuple[Any, ...]], dict[int, tuple[Any, ...]]]:
    """Every task and every message by id, before a run: what check_invariant compares with."""
    tasks = {r[0]: r for r in conn.execute('SELECT * FROM "Task" ORDER BY id').fetchall()}
    messages = {r[0]: r for r in conn.execute('SELECT * FROM "Message" ORDER BY id').fetchall()}
    return tasks, messages


def ledger(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT source_table, object_key, rows, sha256 FROM pgscale.export_files ORDER BY id"
    ).fetchall()


def test_export_to_s3_duckdb_reads_back_and_restore_returns_the_rows(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    seed_tasks(conn, 3000)
    seed_messages(conn)
    before = conn.execute('SELECT * FROM "Task" ORDER BY id').fetchall()
    messages_before = conn.execute('SELECT * FROM "Message" ORDER BY id').fetchall()
    expected = digest(conn, PREDICATE)
    size_before = scalar(conn, """SELECT pg_table_size('"Task"')""")
    spec = spec_s3(s3_server, bucket)
    store = store_for(spec, s3_env(s3_server))
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    assert report.rows_archived == expected[0] and report.files >= 2
    assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
    assert report.tables == {"public.Message exported": 2 * expected[0]}
    files = ledger(conn)
    tasks = [f for f in files if f[0] == "Task"]
    assert sum(f[2] for f in tasks) == expected[0]
    for _, key, rows, sha in files:
        data = store.fetch(key)
        assert parquet.sha256(data) == sha and parquet.row_count(data) == rows
        note = json.loads(store.fetch(parquet.manifest_key(key)))
        assert note["sha256"] == sha and note["rows"] == rows and note["format"] == parquet.FORMAT
        assert note["key"]["columns"] == ["id"] and note["schema"]["fingerprint"]
    assert duck_digest(download(store, [f[1] for f in tasks], tmp_path)) == expected
    assert scalar(conn, """SELECT pg_table_size('"Task"')""") <= size_before
    # Again: nothing left to export, nothing written twice.
    again = run(job_for(postgres, database, spec), store=store)
    assert again.outcome == "Succeeded" and again.rows_archived == 0 and len(ledger(conn)) == len(files)
    # Restore everything, twice: the tables are as they were, row for row, column for column.
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        picked = archive.select(c, "pgscale", policy="ns/export-tasks")
        first = archive.restore(c, "pgscale", picked, lambda d: store)
        second = archive.restore(c, "pgscale", picked, lambda d: store)
    assert first.inserted == expected[0] * 3 and first.skipped == 0
    assert second.inserted == 0 and second.skipped == expected[0] * 3
    assert conn.execute('SELECT * FROM "Task" ORDER BY id').fetchall() == before
    assert conn.execute('SELECT * FROM "Message" ORDER BY id').fetchall() == messages_before


HOSTILE = """
CREATE SCHEMA app_data;
CREATE SCHEMA "app data";
CREATE TYPE "app data"."Mood" AS ENUM ('calm', 'busy', 'on "fire"');
CREATE TABLE app_data."JobLog" (
    "key" text PRIMARY KEY,
    mood "app data"."Mood" NOT NULL,
    moods "app data"."Mood"[],
    "finishedAt" timestamp without time zone NOT NULL,
    at timestamptz,
    day date,
    price numeric(12, 3),
    ratio numeric,
    big numeric(60, 10),
    payload jsonb,
    raw json,
    tags text[],
    scores integer[],
    blob bytea,
    ident uuid,
    idents uuid[],
    span interval,
    addr inet,
    flag boolean,
    small smallint,
    real_ real,
    dbl double precision,
    clock time,
    during tstzrange,
    doubled bigint GENERATED ALWAYS AS (small * 2) STORED
);
INSERT INTO app_data."JobLog"
SELECT 'key ' || g || ' "quoted" ' || repeat('é', g % 3),
       (ARRAY['calm', 'busy', 'on "fire"'])[1 + g % 3]::"app data"."Mood",
       ARRAY['calm', 'on "fire"']::"app data"."Mood"[],
       timestamp '2020-01-01 12:34:56.789012' + g * interval '1 hour',
       timestamptz '2020-01-01 00:00:00.123456+05' + g * interval '1 minute',
       date '2020-02-29' + g,
       (g * 1.125)::numeric(12, 3),
       CASE WHEN g % 7 = 0 THEN 'NaN'::numeric ELSE g / 3.0 END,
       10::numeric(60, 10) ^ 40 + g,
       jsonb_build_object('g', g, 'nested', jsonb_build_array(1, 'two', null)),
       '{"b": 1,  "a": [2]}'::json,
       ARRAY['a', NULL, 'c,d', '"q"'],
       ARRAY[g, NULL, -g],
       decode(md5(g::text), 'hex'),
       md5(g::text)::uuid,
       ARRAY[md5(g::text)::uuid],
       make_interval(months => g % 13, days => g, secs => 1.5),
       '10.0.0.1/8'::inet,
       g % 2 = 0,
       (g % 100)::smallint,
       g / 7.0,
       g / 3.0,
       time '13:14:15.161718',
       tstzrange(now() - interval '1 day', NULL)
FROM generate_series(1, 700) g;
UPDATE app_data."JobLog" SET payload = NULL, tags = NULL, blob = NULL WHERE small = 5;
CREATE TABLE "app data"."Job ""log"" 2024" (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "job key" text NOT NULL REFERENCES app_data."JobLog" ("key") ON DELETE CASCADE,
    note text
);
INSERT INTO "app data"."Job ""log"" 2024" ("job key", note)
SELECT "key", 'note ' || n FROM app_data."JobLog", generate_series(1, 2) n;
"""


def test_hostile_shapes_round_trip_on_a_volume(
    postgres: Any, database: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    conn.execute(HOSTILE)
    table, child = 'app_data."JobLog"', '"app data"."Job ""log"" 2024"'
    before = conn.execute(f"SELECT t::text FROM {table} t ORDER BY key").fetchall()  # NaN != NaN in Python
    children = conn.execute(f"SELECT * FROM {child} ORDER BY id").fetchall()
    spec = {
        "profileRef": {"name": "app"},
        "table": {"schema": "app_data", "name": "JobLog"},
        "children": {"mode": "archive"},
        "ageColumn": "finishedAt",
        "olderThan": "30d",
        "action": "export",
        "export": {"destination": {"filesystem": {"claimName": "cold", "path": "exports/"}}, "rowsPerFile": 200},
    }
    env = {"PGSCALE_FS_ROOT": str(tmp_path)}
    store = store_for(spec, env)
    assert isinstance(store, FilesystemStore)
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    assert report.rows_archived == 700 and scalar(conn, f"SELECT count(*) FROM {table}") == 0
    assert scalar(conn, f"SELECT count(*) FROM {child}") == 0
    files = ledger(conn)
    assert {f[0] for f in files} == {"JobLog", 'Job "log" 2024'}
    assert any("app%20data.Job%20%22log%22%202024/" in f[1] for f in files)
    paths = [str(tmp_path / "exports" / f[1]) for f in files if f[0] == "JobLog"]
    assert all(Path(p).exists() and Path(parquet.manifest_key(p)).exists() for p in paths)
    got = (
        duckdb.connect()
        .execute(
            'SELECT count(*), count(DISTINCT key), min("finishedAt"), max(price), '
            f"count(*) FILTER (WHERE mood = 'on \"fire\"') FROM read_parquet([{', '.join(repr(p) for p in paths)}])"
        )
        .fetchone()
    )
    assert got is not None and got[0] == 700 and got[1] == 700
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        picked = archive.select(c, "pgscale", policy="ns/export-tasks")
        done = archive.restore(c, "pgscale", picked, lambda d: store)
        again = archive.restore(c, "pgscale", picked, lambda d: store)
    assert done.inserted == 700 * 3 and again.inserted == 0
    assert conn.execute(f"SELECT t::text FROM {table} t ORDER BY key").fetchall() == before
    assert conn.execute(f"SELECT * FROM {child} ORDER BY id").fetchall() == children


KILL_POINTS = [
    "export-pending",
    "export-locked",
    "export-written",
    "export-manifest",
    "export-verified",
    "export-deleted",
    "export-recorded",
    "export-committed",
    "export-pending@3",
    "export-written@2",
    "export-verified@4",
    "export-deleted@3",
    "export-recorded@5",
]


def run_job(spec: dict[str, Any], postgres: Any, database: str, env: dict[str, str], point: str | None) -> int:
    job_input = {
        "namespace": "ns",
        "name": "export-tasks",
        "spec": spec,
        "profile": {"connection": {"secretRef": {"name": "db"}}, "stateSchema": "pgscale"},
        "options": {},
    }
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "PGSCALE_JOB_INPUT": json.dumps(job_input),
        "PGSCALE_DB_HOST": postgres.host,
        "PGSCALE_DB_PORT": str(postgres.port),
        "PGSCALE_DB_DBNAME": database,
        "PGSCALE_DB_USER": "postgres",
        "PGSCALE_DB_PASSWORD": postgres.PASSWORD,
        **env,
    }
    if point:
        environ["PGSCALE_FAULT_POINT"] = point
    exe = str(Path(sys.executable).parent / "pgscale")
    done = subprocess.run([exe, "job", "retention"], env=environ, capture_output=True, text=True, timeout=300)
    return done.returncode


def test_killed_at_any_point_every_row_is_in_the_table_or_in_exactly_one_verified_file(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    seed_tasks(conn, 6000)
    seed_messages(conn)
    conn.execute('ANALYZE "Task"')  # batches of about rowsPerFile rows, from the table's statistics
    originals, messages = rows_by_id(conn)
    spec = spec_s3(
        s3_server,
        bucket,
        export={
            "destination": {"s3": {"bucket": bucket, "prefix": "cold/", "endpoint": s3_server.endpoint}},
            "rowsPerFile": 100,
        },
    )
    env = s3_env(s3_server)
    store = store_for(spec, env)
    points = list(KILL_POINTS)
    random.Random(17).shuffle(points)
    for point in points:
        assert run_job(spec, postgres, database, env, point) == -9, point  # SIGKILL at that point
        check_invariant(conn, store, originals, messages, point)
    assert run_job(spec, postgres, database, env, None) == 0
    check_invariant(conn, store, originals, messages, "final")
    assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
    assert scalar(conn, "SELECT count(*) FROM pgscale.export_batches WHERE status = 'pending'") == 0
    # The run log counts every exported row once, killed runs included (their last tallies folded later).
    exported = sum(f[2] for f in ledger(conn) if f[0] == "Task")
    assert scalar(conn, "SELECT sum(rows_archived) FROM pgscale.retention_runs") == exported
    assert scalar(conn, "SELECT count(*) FROM pgscale.export_tallies") == 0
    # No object in the bucket but the done batches' files and manifests.
    listed = s3_client(s3_server.endpoint, "us-east-1", s3_server.ACCESS_KEY, s3_server.SECRET_KEY, True)
    keys = {
        o["Key"]
        for page in listed.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    }
    recorded = {"cold/" + k for f in ledger(conn) for k in (f[1], parquet.manifest_key(f[1]))}
    assert keys == recorded


def check_invariant(
    conn: psycopg.Connection,
    store: ObjectStore,
    originals: dict[int, tuple[Any, ...]],
    messages: dict[int, tuple[Any, ...]],
    point: str,
) -> None:
    """Every original row is in the table (unchanged) or in exactly one file of a done batch."""
    for table, want in (("Task", originals), ("Message", messages)):
        present = {r[0]: r for r in conn.execute(f'SELECT * FROM "{table}" ORDER BY id').fetchall()}
        exported: dict[int, int] = {}
        for _, key, rows, sha in [f for f in ledger(conn) if f[0] == table]:
            data = store.fetch(key)
            assert parquet.sha256(data) == sha and parquet.row_count(data) == rows, (point, key)
            for record in parquet.records(parquet.read(data), ["id"]):
                exported[record[0]] = exported.get(record[0], 0) + 1
        assert all(n == 1 for n in exported.values()), (point, table, "in two files")
        assert not set(exported) & set(present), (point, table, "in the table and a file")
        assert set(exported) | set(present) == set(want), (point, table, "lost")
        assert all(present[k] == want[k] for k in present), (point, table, "changed")
    time.sleep(0)


@pytest.fixture(scope="module")
def locked_s3(workdir: Path) -> Any:
    """A moto server that checks credentials and permissions (after the 4 requests that set it up)."""
    import localenv

    server = localenv.S3Server(workdir / "locked-integration", authenticated_after=4)
    try:
        yield server.start()
    finally:
        server.stop()


def test_a_run_that_cannot_write_deletes_nothing_and_names_the_field(
    postgres: Any, database: str, conn: psycopg.Connection, locked_s3: Any
) -> None:
    s3_client(locked_s3.endpoint, "us-east-1", "setup", "setup", True).create_bucket(Bucket="locked")
    reader = s3_user(locked_s3.endpoint, "reader", ["s3:GetObject"])
    seed_tasks(conn, 1500)
    before = conn.execute('SELECT * FROM "Task" ORDER BY id').fetchall()
    cases = [
        (
            "locked",
            locked_s3.endpoint,
            {"AWS_ACCESS_KEY_ID": "AKIAWRONG", "AWS_SECRET_ACCESS_KEY": "x"},
            "spec.export.destination.s3.credentialsSecretRef: ",
        ),
        ("locked", locked_s3.endpoint, reader, "spec.export.destination.s3.credentialsSecretRef: "),
        ("locked", f"http://127.0.0.1:{free_port()}", reader, "spec.export.destination.s3.endpoint: "),
    ]
    for bucket, endpoint, env, field in cases:
        spec = spec_s3(locked_s3, bucket)
        spec["export"]["destination"]["s3"]["endpoint"] = endpoint
        store = open_store(RetentionPolicySpec.model_validate(spec).export_or_default.destination, env, attempts=1)
        report = run(job_for(postgres, database, spec), store=store)
        assert report.outcome == "Failed" and report.message.startswith(field), report.message
        assert "no row was deleted" in report.message and reader["AWS_SECRET_ACCESS_KEY"] not in report.message
        assert conn.execute('SELECT * FROM "Task" ORDER BY id').fetchall() == before
    assert scalar(conn, "SELECT count(*) FROM pgscale.export_files") == 0


PARTITION_POINTS = [
    "partition-detached",
    "export-partition-pending",
    "export-object-written",
    "export-partition-written",
    "export-partition-verified",
    "export-partition-dropped",
    "export-partition-recorded",
    "export-partition-committed",
]


def test_whole_partitions_are_exported_verified_and_dropped_even_when_killed(
    postgres: Any, database: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    from test_retention_partitions import make_log

    make_log(conn, default=False)
    originals = {r[0]: r for r in conn.execute('SELECT * FROM "Log" ORDER BY id').fetchall()}
    old = scalar(conn, """SELECT count(*) FROM "Log" WHERE "createdAt" < now() - interval '90 days'""")
    spec = {
        "profileRef": {"name": "app"},
        "table": {"name": "Log"},
        "ageColumn": "createdAt",
        "olderThan": "90d",
        "action": "export",
        "export": {"destination": {"filesystem": {"claimName": "cold"}}, "rowsPerFile": 2000},
    }
    env = {"PGSCALE_FS_ROOT": str(tmp_path)}
    store = store_for(spec, env)

    def check(point: str) -> None:
        present = {r[0] for r in conn.execute('SELECT id FROM "Log"').fetchall()}
        detached = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_description d ON d.objoid = c.oid "
            "WHERE d.description LIKE 'pgscale-retention:%'"
        ).fetchall()
        for (name,) in detached:  # detached, not yet exported: its rows are there
            present |= {r[0] for r in conn.execute(f'SELECT id FROM "{name}"').fetchall()}
        exported: dict[int, int] = {}
        for _, key, rows, sha in ledger(conn):
            data = store.fetch(key)
            assert parquet.sha256(data) == sha and parquet.row_count(data) == rows, point
            for (i,) in parquet.records(parquet.read(data), ["id"]):
                exported[i] = exported.get(i, 0) + 1
        assert all(n == 1 for n in exported.values()), point
        assert not set(exported) & present, point
        assert set(exported) | present == set(originals), point

    for point in PARTITION_POINTS:
        assert run_job(spec, postgres, database, env, point) == -9, point
        check(point)
    assert run_job(spec, postgres, database, env, None) == 0
    check("final")
    assert scalar(conn, """SELECT count(*) FROM "Log" WHERE "createdAt" < now() - interval '90 days'""") == 0
    files = conn.execute(
        "SELECT partition_name, rows FROM pgscale.export_files WHERE partition_name IS NOT NULL"
    ).fetchall()
    assert len(files) >= 4 and scalar(conn, "SELECT count(*) FROM pgscale.export_batches WHERE status <> 'done'") == 0
    assert (
        sum(r for _, r in files)
        + scalar(conn, "SELECT coalesce(sum(rows), 0) FROM pgscale.export_files WHERE partition_name IS NULL")
        == old
    )
    first = sorted(f[0] for f in files)[0]
    paths = [str(tmp_path / f[1]) for f in ledger(conn)]
    got = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet([{', '.join(repr(p) for p in paths)}])")
    assert got.fetchone() == (old,)
    # A partition comes back into the table (into a partition that covers it again).
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        month = first.removeprefix("Log_")
        lo = f"{month[:4]}-{month[5:7]}-01"
        c.execute(
            f"""CREATE TABLE "{first}" PARTITION OF "Log"
                FOR VALUES FROM ('{lo}') TO ('{lo}'::date + interval '1 month')"""
        )
        picked = archive.select(c, "pgscale", policy="ns/export-tasks", partition=first)
        done = archive.restore(c, "pgscale", picked, lambda d: store)
    start = datetime.fromisoformat(lo).replace(tzinfo=UTC)
    end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    want = {k: v for k, v in originals.items() if start <= v[1] < end}
    assert done.inserted == len(want) > 0
    assert {r[0]: r for r in conn.execute(f'SELECT * FROM "{first}" ORDER BY id').fetchall()} == want


THREADS = """
CREATE SCHEMA forum;
CREATE TABLE forum."Post" (
    id text PRIMARY KEY,
    "parentId" text REFERENCES forum."Post" (id) ON DELETE CASCADE,
    "createdAt" timestamp NOT NULL,
    body text NOT NULL
);
CREATE TABLE forum."Like" (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    "postId" text NOT NULL REFERENCES forum."Post" (id) ON DELETE CASCADE
);
-- 300 old threads and 100 young ones; every thread: a root, two replies, a reply to each reply
-- (the replies young in every thread); a like on every reply.
INSERT INTO forum."Post" SELECT 't' || g, NULL, now()::timestamp - CASE WHEN g <= 300 THEN interval '200 days'
    ELSE interval '1 day' END, 'root ' || g FROM generate_series(1, 400) g;
INSERT INTO forum."Post" SELECT 't' || g || '.' || r, 't' || g, now()::timestamp - interval '1 hour', 'reply'
    FROM generate_series(1, 400) g, generate_series(1, 2) r;
INSERT INTO forum."Post" SELECT 't' || g || '.' || r || '.1', 't' || g || '.' || r, now()::timestamp, 'reply to reply'
    FROM generate_series(1, 400) g, generate_series(1, 2) r;
INSERT INTO forum."Like" ("postId") SELECT id FROM forum."Post" WHERE "parentId" IS NOT NULL;
"""


def test_a_table_that_references_itself_exports_each_row_with_everything_below_it(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """Replies go with the thread they belong to (young or not), into the same file; nothing is lost and
    a restore gives back every row."""
    conn.execute(THREADS)
    posts = conn.execute('SELECT * FROM forum."Post" ORDER BY id').fetchall()
    likes = conn.execute('SELECT * FROM forum."Like" ORDER BY id').fetchall()
    spec = {
        "profileRef": {"name": "app"},
        "table": {"schema": "forum", "name": "Post"},
        "ageColumn": "createdAt",
        "olderThan": "30d",
        "children": {"mode": "archive"},
        "action": "export",
        "export": {
            "destination": {"s3": {"bucket": bucket, "prefix": "cold/", "endpoint": s3_server.endpoint}},
            "rowsPerFile": 40,
        },
    }
    env = s3_env(s3_server)
    store = store_for(spec, env)
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    assert report.rows_archived == 300 * 5  # the old roots with everything below them
    assert scalar(conn, 'SELECT count(*) FROM forum."Post"') == 100 * 5
    young = """SELECT count(*) FROM forum."Post"
               WHERE "parentId" IS NULL AND "createdAt" > now() - interval '30 days'"""
    assert scalar(conn, young) == scalar(conn, 'SELECT count(*) FROM forum."Post" WHERE "parentId" IS NULL') == 100
    assert scalar(conn, 'SELECT count(*) FROM forum."Like"') == 100 * 4
    # Each file of Post holds whole threads: every reply's parent is in the same file.
    for _, key, rows, _ in [f for f in ledger(conn) if f[0] == "Post"]:
        table = parquet.read(store.fetch(key))
        ids = set(table.column("id").to_pylist())
        assert len(ids) == rows
        assert all(p is None or p in ids for p in table.column("parentId").to_pylist()), key
    assert scalar(conn, "SELECT sum(rows_archived) FROM pgscale.retention_runs") == 300 * 5
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        done = archive.restore(c, "pgscale", archive.select(c, "pgscale", policy="ns/export-tasks"), lambda d: store)
    assert done.inserted == 300 * 5 + 300 * 4
    assert conn.execute('SELECT * FROM forum."Post" ORDER BY id').fetchall() == posts
    assert conn.execute('SELECT * FROM forum."Like" ORDER BY id').fetchall() == likes


def test_a_stop_request_ends_the_run_after_the_overlapping_batch_commits(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """Two batches are in flight (one writing its files, the next taken): a stop lets the first commit and
    the next finish too, leaves no batch pending, and the next run goes on from there."""
    import threading

    seed_tasks(conn, 3000)
    seed_messages(conn)
    conn.execute('ANALYZE "Task"')
    originals, messages = rows_by_id(conn)
    spec = spec_s3(s3_server, bucket)
    spec["export"]["rowsPerFile"] = 100
    env = s3_env(s3_server)
    store = store_for(spec, env)
    stop = threading.Event()

    def stop_after_first_batch() -> None:
        with psycopg.connect(postgres.dsn(database), autocommit=True) as watcher:
            while not stop.is_set():
                if watcher.execute("SELECT to_regclass('pgscale.export_batches') IS NOT NULL").fetchone() == (True,):
                    done = scalar(watcher, "SELECT count(*) FROM pgscale.export_batches WHERE status = 'done'")
                    if done >= 1:
                        stop.set()
                time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_first_batch, daemon=True)
    watcher.start()
    report = run(job_for(postgres, database, spec), stop=stop, store=store)
    watcher.join(timeout=10)
    assert report.outcome == "Partial" and "stopped on request" in report.message, report.message
    assert scalar(conn, "SELECT count(*) FROM pgscale.export_batches WHERE status = 'pending'") == 0
    assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') > 0  # stopped before the end
    check_invariant(conn, store, originals, messages, "stopped")
    assert scalar(conn, "SELECT sum(rows_archived) FROM pgscale.retention_runs") == report.rows_archived
    again = run(job_for(postgres, database, spec), store=store)
    assert again.outcome == "Succeeded", again.message
    assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
    check_invariant(conn, store, originals, messages, "final")


def test_a_run_log_fold_that_gives_way_after_a_commit_never_touches_the_committed_batch(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """The batch is committed when its tallies are folded: a fold that fails (here a lock_timeout, once)
    must not take the batch again (its keys would be rewritten or cleared: the only copy of its rows)."""
    seed_tasks(conn, 600)
    seed_messages(conn)
    originals, messages = rows_by_id(conn)
    spec = spec_s3(s3_server, bucket)
    spec["export"]["rowsPerFile"] = 100
    store = store_for(spec, s3_env(s3_server))
    run(job_for(postgres, database, spec), dry_run=True, store=store)  # the state schema exists
    conn.execute("CREATE SEQUENCE fold_once")
    conn.execute(
        """CREATE FUNCTION fold_gives_way() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.rows_archived <> OLD.rows_archived AND nextval('fold_once') = 1 THEN
               RAISE EXCEPTION 'canceling statement due to lock timeout' USING ERRCODE = '55P03';
             END IF;
             RETURN NEW;
           END $$"""
    )
    conn.execute(
        "CREATE TRIGGER fold_gives_way BEFORE UPDATE ON pgscale.retention_runs "
        "FOR EACH ROW EXECUTE FUNCTION fold_gives_way()"
    )
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    check_invariant(conn, store, originals, messages, "fold gave way")
    assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
    # The tally the failed fold left is folded by a later one: the run log counts every row once.
    assert scalar(conn, "SELECT count(*) FROM pgscale.export_tallies") == 0
    assert scalar(conn, "SELECT sum(rows_archived) FROM pgscale.retention_runs") == report.rows_archived


def test_a_batch_below_a_batch_still_uploading_waits_for_it_instead_of_failing_the_run(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """A tree across two overlapping batches: the later batch's rows are parents of rows the batch before
    holds (locked until its slow upload commits). Waiting on the batch before is no contention with the
    application: the later batch waits for it, however long the upload takes, instead of spending its
    retries on lockTimeout and failing the run."""
    conn.execute(
        """CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree (id) ON DELETE CASCADE,
                              at timestamptz NOT NULL, body text NOT NULL) WITH (fillfactor = 100)"""
    )
    # Parents first, then their children in reverse order, then every parent updated (its new version
    # after all children): the last batch of children holds the children of the first batch of parents.
    conn.execute("INSERT INTO tree SELECT g, NULL, now() - interval '1 year', 'p' FROM generate_series(1, 20) g")
    conn.execute(
        "INSERT INTO tree SELECT 1000 + g, g, now() - interval '1 year', 'c' FROM generate_series(20, 1, -1) g"
    )
    conn.execute("UPDATE tree SET body = 'parent' WHERE parent IS NULL")
    rows = conn.execute("SELECT * FROM tree ORDER BY id").fetchall()
    spec = {
        "profileRef": {"name": "app"},
        "table": {"name": "tree"},
        "ageColumn": "at",
        "olderThan": "30d",
        "children": {"mode": "archive"},
        "action": "export",
        "lockTimeout": "10ms",
        "export": {
            "destination": {"s3": {"bucket": bucket, "prefix": "cold/", "endpoint": s3_server.endpoint}},
            "rowsPerFile": 10,
        },
    }
    store = store_for(spec, s3_env(s3_server))
    put_new = store.put_new

    def slow_put(key: str, *args: Any, **kwargs: Any) -> bool:
        if key.endswith(".parquet"):
            time.sleep(3.5)  # longer than every retry of the batch after it together (~2.9 s)
        return put_new(key, *args, **kwargs)

    store.put_new = slow_put  # type: ignore[method-assign]
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    assert scalar(conn, "SELECT count(*) FROM tree") == 0
    assert report.rows_archived == 40
    exported = []
    for _, key, n, sha in ledger(conn):
        data = store.fetch(key)
        assert parquet.sha256(data) == sha and parquet.row_count(data) == n
        exported += [r[0] for r in parquet.records(parquet.read(data), ["id"])]
    assert sorted(exported) == [r[0] for r in rows]
    # Children were exported before their parents: a restore of everything still gives every row back.
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        archive.restore(c, "pgscale", archive.select(c, "pgscale", policy="ns/export-tasks"), lambda d: store)
    assert conn.execute("SELECT * FROM tree ORDER BY id").fetchall() == rows


def test_a_role_limited_to_one_connection_exports_on_one_session(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """The second session only lets batches overlap: a database that refuses it (a role's CONNECTION LIMIT,
    max_connections reached) gets the batches one after another, not a failed run."""
    seed_tasks(conn, 300)
    role = f"solo_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'solo' CONNECTION LIMIT 1")
    conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO {role}')
    conn.execute(f'ALTER TABLE "Task" OWNER TO {role}')
    conn.execute(f'ALTER TABLE "Message" OWNER TO {role}')
    spec = spec_s3(s3_server, bucket)
    spec["export"]["rowsPerFile"] = 50
    store = store_for(spec, s3_env(s3_server))
    info = ConnInfo(host=postgres.host, port=postgres.port, dbname=database, user=role, password="solo")
    job = JobInput("ns", "export-tasks", spec, "pgscale", info)
    try:
        report = run(job, store=store)
        assert report.outcome == "Succeeded", report.message
        assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
        assert report.rows_archived == scalar(conn, "SELECT sum(rows) FROM pgscale.export_files WHERE root")
    finally:
        conn.execute('ALTER TABLE "Task" OWNER TO postgres')
        conn.execute('ALTER TABLE "Message" OWNER TO postgres')
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_rows_kept_for_their_children_are_counted_once_in_the_run_log(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """A full batch's next one starts on the page of its last row: the rows kept there (children mode
    keep) are not counted twice."""
    seed_tasks(conn, 3000)
    conn.execute(
        """INSERT INTO "Message" ("taskId", body, "createdAt") SELECT id, 'kept', "createdAt" FROM "Task"
           WHERE id % 7 = 0"""
    )
    kept = scalar(
        conn,
        f'SELECT count(*) FROM "Task" t WHERE {PREDICATE} '
        'AND EXISTS (SELECT 1 FROM "Message" m WHERE m."taskId" = t.id)',
    )
    spec = spec_s3(s3_server, bucket, children={"mode": "keep"})
    spec["export"]["rowsPerFile"] = 100
    store = store_for(spec, s3_env(s3_server))
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    skipped = {k: v for k, v in report.tables.items() if k.startswith("skipped")}
    assert sum(skipped.values()) == kept, (skipped, kept)


def test_a_batch_that_gives_way_at_its_commit_is_redone_with_the_one_after_it(
    postgres: Any, database: str, conn: psycopg.Connection, s3_server: Any, bucket: str
) -> None:
    """A commit that fails (here a deferred check raising a serialization failure, twice) while the next
    batch is taken on the other session: the next one is let go, both are done again alone, and the run
    ends with every row in exactly one verified file."""
    seed_tasks(conn, 900)
    seed_messages(conn)
    originals, messages = rows_by_id(conn)
    spec = spec_s3(s3_server, bucket)
    spec["export"]["rowsPerFile"] = 100
    store = store_for(spec, s3_env(s3_server))
    run(job_for(postgres, database, spec), dry_run=True, store=store)  # the state schema exists
    conn.execute("CREATE SEQUENCE commit_gives_way")
    conn.execute(
        """CREATE FUNCTION commit_gives_way() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.status = 'done' AND nextval('commit_gives_way') IN (2, 4) THEN
               RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
             END IF;
             RETURN NULL;
           END $$"""
    )
    conn.execute(
        "CREATE CONSTRAINT TRIGGER commit_gives_way AFTER UPDATE ON pgscale.export_batches "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_gives_way()"
    )
    report = run(job_for(postgres, database, spec), store=store)
    assert report.outcome == "Succeeded", report.message
    assert scalar(conn, "SELECT nextval('commit_gives_way')") > 4  # both failures happened
    check_invariant(conn, store, originals, messages, "commit gave way")
    assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
    assert scalar(conn, "SELECT count(*) FROM pgscale.export_batches WHERE status = 'pending'") == 0
    assert scalar(conn, "SELECT sum(rows_archived) FROM pgscale.retention_runs") == report.rows_archived
