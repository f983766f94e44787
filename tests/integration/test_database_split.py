"""DatabaseSplit against two real PostgreSQL servers with wal_level=logical.

The sample app's "Message" table moves to a database of its own while a writer inserts and
updates messages throughout: after the cutover every row equals the writer's record, the
target's sequence continues without collision, the writes' longest block is reported; a
rollback loses nothing; finalize leaves no slot, publication or subscription on either
server. Each refusal is a Stalled-ready SpecError naming the table and the SQL fix, with
nothing changed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from localenv import Postgres

from conftest import ROOT, scalar
from pgscale.api.databasesplit import DatabaseSplitSpec
from pgscale.errors import SpecError, TransientError
from pgscale.pg import split as sqls
from pgscale.pg.connection import ConnInfo
from pgscale.split import Report, Side, Split, advance, drop_replication, resolve_tables
from writers import MessageWriter, messages, until

pytestmark = pytest.mark.postgres

SPEC: dict[str, Any] = {
    "source": {"profileRef": {"name": "monolith"}},
    "target": {"profileRef": {"name": "messages"}},
    "tables": [{"name": "Message"}],
    "crossForeignKeys": "skip",
    "lockBudget": {"lockTimeout": "500ms", "retries": 20, "catchUpTimeout": "10s"},
}


@pytest.fixture
def servers(logical_servers: tuple[Postgres, Postgres]) -> tuple[Postgres, Postgres]:
    return logical_servers


@pytest.fixture
def databases(servers: tuple[Postgres, Postgres]) -> Iterator[tuple[str, str]]:
    """A sample-app database on the source and an empty one on the target; replication objects dropped after."""
    source, target = servers
    name = f"app_{uuid.uuid4().hex[:10]}"
    source.execute(f'CREATE DATABASE "{name}"')
    target.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(source.dsn(name), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
    yield name, name
    for server in servers:
        with psycopg.connect(server.dsn(name), autocommit=True) as conn:
            for (sub,) in conn.execute("SELECT subname FROM pg_subscription").fetchall():
                conn.execute(f'ALTER SUBSCRIPTION "{sub}" DISABLE')
                conn.execute(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)')
                conn.execute(f'DROP SUBSCRIPTION "{sub}"')
    for server in servers:
        server.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
        server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def side(server: Postgres, dbname: str, conn: psycopg.Connection) -> Side:
    info = ConnInfo(host=server.host, port=server.port, dbname=dbname, user="postgres", password=server.PASSWORD)
    return Side(conn=conn, state_schema="pgscale", replication=info, info=info)


@pytest.fixture
def conns(servers: tuple[Postgres, Postgres], databases: tuple[str, str]) -> Iterator[tuple[Any, Any]]:
    source, target = servers
    with (
        psycopg.connect(source.dsn(databases[0]), autocommit=True) as s,
        psycopg.connect(target.dsn(databases[1]), autocommit=True) as t,
    ):
        yield s, t


def make_split(
    servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any], **changes: Any
) -> Split:
    spec = DatabaseSplitSpec.model_validate({**SPEC, **changes})
    src = side(servers[0], databases[0], conns[0])
    dst = side(servers[1], databases[1], conns[1])
    tables = resolve_tables(conns[0], spec)
    return Split(key=f"t/{uuid.uuid4().hex[:8]}", spec=spec, tables=tables, source=src, target=dst)


def replication_objects(server: Postgres, dbname: str) -> tuple[int, int, int]:
    """(slots on the server, publications, subscriptions) of a database."""
    with psycopg.connect(server.dsn(dbname), autocommit=True) as conn:
        return (
            scalar(conn, "SELECT count(*) FROM pg_replication_slots"),
            scalar(conn, "SELECT count(*) FROM pg_publication"),
            scalar(conn, "SELECT count(*) FROM pg_subscription"),
        )


def refused(split: Split) -> SpecError:
    with pytest.raises(SpecError) as err:
        advance(split, "source")
    return err.value


def assert_unchanged(servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]) -> None:
    assert replication_objects(servers[0], databases[0]) == (0, 0, 0)
    assert replication_objects(servers[1], databases[1]) == (0, 0, 0)
    assert scalar(conns[1], "SELECT count(*) FROM pg_class WHERE relname = 'Message' AND relkind = 'r'") == 0
    assert scalar(conns[0], "SELECT to_regclass('pgscale.database_splits')") is None


def test_refusals_name_the_table_and_the_fix_and_change_nothing(
    servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]
) -> None:
    src, dst = conns
    # A foreign key across the cut: "Message" references "Task".
    err = refused(make_split(servers, databases, conns, crossForeignKeys="refuse"))
    assert err.reason == "CrossForeignKeys"
    assert '\'Message_taskId_fkey\' on public."Message" references public."Task"' in err.message
    assert 'ALTER TABLE public."Message" DROP CONSTRAINT "Message_taskId_fkey"' in err.message
    assert "crossForeignKeys: skip" in err.message and "nothing was changed" in err.message
    assert_unchanged(servers, databases, conns)
    # A table without replica identity.
    src.execute('CREATE TABLE "Note" (body text)')
    err = refused(make_split(servers, databases, conns, tables=[{"name": "Note"}]))
    assert err.reason == "NoReplicaIdentity"
    assert 'public."Note" has no primary key' in err.message
    assert 'ALTER TABLE public."Note" REPLICA IDENTITY FULL' in err.message
    assert_unchanged(servers, databases, conns)
    # A target table with other columns.
    dst.execute('CREATE TABLE "Message" (id bigint PRIMARY KEY, text text)')
    err = refused(make_split(servers, databases, conns))
    assert err.reason == "TargetTableDiffers"
    assert 'public."Message" exists on the target with other columns' in err.message
    assert "target only: text text" in err.message and 'DROP TABLE public."Message"' in err.message
    assert replication_objects(servers[0], databases[0]) == (0, 0, 0)
    assert scalar(src, "SELECT to_regclass('pgscale.database_splits')") is None


def test_wal_level_not_logical_is_refused(
    private_postgres: Postgres, servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]
) -> None:
    """The source runs wal_level=replica (the fixture's default)."""
    private_postgres.execute("CREATE DATABASE app")
    with psycopg.connect(private_postgres.dsn("app"), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        split = make_split(servers, databases, (conn, conns[1]))
        split.source = side(private_postgres, "app", conn)
        err = refused(split)
    assert err.reason == "WalLevelNotLogical"
    assert "wal_level=replica" in err.message and "ALTER SYSTEM SET wal_level = logical" in err.message
    assert replication_objects(servers[1], databases[1]) == (0, 0, 0)


def drive(split: Split, desired: Any, until_phase: str, timeout: float = 120) -> Report:
    """Call advance as the controller does until the split reaches a phase."""
    deadline = time.monotonic() + timeout
    last: Report | None = None
    while time.monotonic() < deadline:
        try:
            last = advance(split, desired)
        except TransientError:
            time.sleep(0.3)
            continue
        if last.phase == until_phase and last.done:
            return last
        time.sleep(0.3)
    raise AssertionError(f"split did not reach {until_phase}: {last}")


def test_move_cutover_rollback_and_finalize_with_a_writer(
    servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any], tmp_path: Path
) -> None:
    src, dst = conns
    src.execute("INSERT INTO \"Task\" (title) SELECT 'task ' || g FROM generate_series(1, 10) g")
    src.execute(
        """CREATE TYPE mood AS ENUM ('calm', 'busy');
           CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 200);
           ALTER TABLE "Message" ADD COLUMN mood mood DEFAULT 'calm', ADD COLUMN tag short_text;
           CREATE INDEX "Message_createdAt_idx" ON "Message" ("createdAt");
           COMMENT ON TABLE "Message" IS 'Chat messages';"""
    )
    src.execute(
        'INSERT INTO "Message" (body, "taskId") SELECT \'seed \' || g, 1 + g % 10 FROM generate_series(1, 3000) g'
    )
    split = make_split(servers, databases, conns)
    record = messages(src)
    dsns = {"source": servers[0].dsn(databases[0]), "target": servers[1].dsn(databases[1])}
    writer = MessageWriter(dsns, record)
    writer.start()
    try:
        report = drive(split, "source", "Replicating")
        assert {t.state for t in report.tables} == {"ready"}
        assert scalar(dst, "SELECT obj_description('\"Message\"'::regclass, 'pg_class')") == "Chat messages"
        assert scalar(dst, "SELECT count(*) FROM pg_indexes WHERE indexname = 'Message_createdAt_idx'") == 1
        assert scalar(dst, "SELECT count(*) FROM pg_constraint WHERE conname = 'Message_taskId_fkey'") == 0
        # The target refuses the application's writes before the cutover.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            dst.execute("INSERT INTO \"Message\" (body) VALUES ('early')")
        time.sleep(1)
        report = drive(split, "target", "CutOver")
        print("\n" + "; ".join(e.message for e in report.events))
        assert report.writes_to == "target" and report.last is not None
        assert report.last.direction == "toTarget" and report.last.rows_verified >= 3000
        block_ms = report.last.write_block_ms
        assert report.longest_block_ms == block_ms
        until("writes on the target", lambda: writer.route == "target" and writer.writes > 0)
        written = writer.writes
        until("more writes on the target", lambda: writer.writes > written + 50)
        # The reverse subscription keeps the source current.
        writer.caught_up(src, dst, "the source to catch up")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            src.execute("INSERT INTO \"Message\" (body) VALUES ('late')")
        report = drive(split, "source", "Replicating")
        assert report.writes_to == "source" and report.last is not None and report.last.direction == "toSource"
        written = writer.writes
        until("writes on the source again", lambda: writer.route == "source" and writer.writes > written + 50)
        writer.caught_up(src, dst, "the target to catch up")
        report = drive(split, "target", "CutOver")
        written = writer.writes
        until("writes on the target again", lambda: writer.route == "target" and writer.writes > written + 50)
    finally:
        writer.stop.set()
        writer.join(10)
    assert not writer.errors, writer.errors[:5]
    with writer.lock:
        assert messages(dst) == record, "every row on the target equals the writer's record"
    until("the source to catch up", lambda: messages(src) == messages(dst))
    # The sequence continues past every id either side gave.
    next_id = scalar(dst, "INSERT INTO \"Message\" (body) VALUES ('after') RETURNING id")
    assert next_id > max(record)
    report = drive(split, "finalize", "Finalized")
    assert (
        replication_objects(servers[0], databases[0])[0] == 0 and replication_objects(servers[1], databases[1])[0] == 0
    )
    assert replication_objects(servers[0], databases[0])[1:] == (0, 0)
    assert replication_objects(servers[1], databases[1])[1:] == (0, 0)
    assert report.longest_block_ms is not None
    longest = writer.longest * 1000
    print(f"\nwrite block: cutover {block_ms} ms, longest {report.longest_block_ms} ms; writer's {longest:.0f} ms")
    # The source tables stay read-only (the guard), and the target takes writes.
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        src.execute("INSERT INTO \"Message\" (body) VALUES ('stale')")
    drop_replication(split)  # idempotent
    assert sqls.load_state(src, "pgscale", split.key) is not None


RUNNER = """
import json, sys, time
import psycopg
from pgscale.api.databasesplit import DatabaseSplitSpec
from pgscale.errors import TransientError
from pgscale.pg.connection import ConnInfo
from pgscale.split import Side, Split, advance, resolve_tables

args = json.loads(sys.argv[1])
src_info, dst_info = ConnInfo(**args["source"]), ConnInfo(**args["target"])
with (
    psycopg.connect(**src_info.kwargs(), autocommit=True) as s,
    psycopg.connect(**dst_info.kwargs(), autocommit=True) as t,
):
    spec = DatabaseSplitSpec.model_validate(args["spec"])
    split = Split(key=args["key"], spec=spec, tables=resolve_tables(s, spec),
                  source=Side(s, "pgscale", src_info, src_info), target=Side(t, "pgscale", dst_info, dst_info))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            advance(split, args["desired"])
        except TransientError:
            pass
        time.sleep(0.2)
sys.exit(3)
"""

# (kill point, what the split is asked for when it is killed there)
KILL_POINTS = [  # tests/e2e/test_faults.py kills the operator at the others
    ("split-after-prepare", "source"),
    ("split-after-slot", "source"),
    ("split-before-lock", "target"),
    ("split-after-reverse-slot", "target"),
]


def kill_at(split: Split, point: str, desired: str) -> None:
    """Run the split in a process of its own that SIGKILLs itself at `point` (pgscale.faults)."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys

    args = {
        "source": dataclasses.asdict(split.source.replication),
        "target": dataclasses.asdict(split.target.replication),
        "spec": split.spec.wire(),
        "key": split.key,
        "desired": desired,
    }
    env = {**os.environ, "PGSCALE_FAULT_POINT": point}
    command = [sys.executable, "-c", RUNNER, json.dumps(args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, f"{point} not reached: {result.returncode} {result.stderr[-2000:]}"


@pytest.mark.parametrize(("point", "desired"), KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_killed_at_each_step_resumes_to_the_same_end(
    point: str, desired: str, servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]
) -> None:
    src, dst = conns
    src.execute("INSERT INTO \"Message\" (body) SELECT 'seed ' || g FROM generate_series(1, 500) g")
    split = make_split(servers, databases, conns)
    if desired != "source":
        drive(split, "source", "Replicating")
    if desired == "finalize":
        drive(split, "target", "CutOver")
    kill_at(split, point, desired)
    # The operator comes back: the split goes on from wherever the kill left it.
    drive(split, "source", "Replicating")
    src.execute("INSERT INTO \"Message\" (body) SELECT 'more ' || g FROM generate_series(1, 50) g")
    until("the target to catch up", lambda: messages(src) == messages(dst))
    drive(split, "target", "CutOver")
    dst.execute("INSERT INTO \"Message\" (body) SELECT 'moved ' || g FROM generate_series(1, 50) g")
    until("the source to catch up", lambda: messages(src) == messages(dst))
    assert len(messages(dst)) == 600
    drive(split, "finalize", "Finalized")
    for server, db in zip(servers, databases, strict=True):
        assert replication_objects(server, db) == (0, 0, 0), point
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        src.execute("INSERT INTO \"Message\" (body) VALUES ('stale')")
    dst.execute("INSERT INTO \"Message\" (body) VALUES ('new')")


def test_resumes_after_both_servers_restart(
    servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]
) -> None:
    """A restart of either server mid-way (connections lost, workers restarted): the split goes on."""
    src = conns[0]
    src.execute("INSERT INTO \"Message\" (body) SELECT 'seed ' || g FROM generate_series(1, 500) g")
    split = make_split(servers, databases, conns)
    drive(split, "source", "Replicating")
    for server in servers:
        server.stop()
        server.start()
    with (
        psycopg.connect(servers[0].dsn(databases[0]), autocommit=True) as s,
        psycopg.connect(servers[1].dsn(databases[1]), autocommit=True) as t,
    ):
        split.source.conn, split.target.conn = s, t
        s.execute("INSERT INTO \"Message\" (body) SELECT 'more ' || g FROM generate_series(1, 50) g")
        drive(split, "target", "CutOver")
        assert messages(s) == messages(t) and len(messages(t)) == 550
        drive(split, "finalize", "Finalized")
    for server, db in zip(servers, databases, strict=True):
        assert replication_objects(server, db) == (0, 0, 0)


def test_a_schema_moves_with_its_types_sequences_keys_indexes_and_grants(
    servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]
) -> None:
    src, dst = conns
    role = f"clerk_{uuid.uuid4().hex[:6]}"  # exists on the source only: its grant is not carried over
    src.execute(
        f"""CREATE ROLE {role};
        CREATE SCHEMA billing;
        CREATE SEQUENCE billing.numbers START 1000;
        CREATE TYPE billing.state AS ENUM ('open', 'paid');
        CREATE DOMAIN billing.amount AS numeric(12, 2) DEFAULT 0 CHECK (VALUE >= 0);
        CREATE TABLE billing.invoice (
            id serial PRIMARY KEY,
            number bigint NOT NULL DEFAULT nextval('billing.numbers') UNIQUE CHECK (number > 0),
            state billing.state NOT NULL DEFAULT 'open',
            total billing.amount);
        CREATE TABLE billing.line (
            invoice_id int REFERENCES billing.invoice (id) ON DELETE CASCADE,
            n int, amount billing.amount,
            doubled numeric GENERATED ALWAYS AS (amount * 2) STORED,
            PRIMARY KEY (invoice_id, n));
        CREATE INDEX line_big ON billing.line (amount) WHERE amount > 10;
        COMMENT ON COLUMN billing.invoice.number IS 'printed on the invoice';
        GRANT SELECT ON billing.invoice TO pg_monitor;
        GRANT SELECT ON billing.line TO {role};
        INSERT INTO billing.invoice (total) SELECT g FROM generate_series(1, 200) g;
        INSERT INTO billing.line (invoice_id, n, amount) SELECT i, n, n * 5 FROM generate_series(1, 200) i,
            generate_series(1, 3) n;"""
    )
    split = make_split(servers, databases, conns, tables=None, schema="billing", crossForeignKeys="refuse")
    assert split.tables == [("billing", "invoice"), ("billing", "line")]
    drive(split, "source", "Replicating")
    assert scalar(dst, "SELECT count(*) FROM billing.line") == 600
    assert scalar(dst, "SELECT sum(doubled) FROM billing.line") == scalar(src, "SELECT sum(doubled) FROM billing.line")
    assert scalar(dst, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'billing.line'::regclass AND contype = 'f'")
    index = "SELECT indexdef FROM pg_indexes WHERE indexname = 'line_big'"
    assert scalar(dst, index) == scalar(src, index)
    assert scalar(dst, "SELECT col_description('billing.invoice'::regclass, 2)") == "printed on the invoice"
    assert scalar(dst, "SELECT has_table_privilege('pg_monitor', 'billing.invoice', 'SELECT')")
    assert scalar(dst, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)) == 0
    with pytest.raises(psycopg.errors.CheckViolation):
        dst.execute("SET session_replication_role = replica; INSERT INTO billing.invoice (total) VALUES (-1)")
    dst.execute("SET session_replication_role = origin")
    drive(split, "target", "CutOver")
    row = dst.execute("INSERT INTO billing.invoice (total) VALUES (1) RETURNING id, number, state::text").fetchone()
    assert row is not None
    assert row[0] > 200 and row[1] > 1199 and row[2] == "open"  # both sequences past the source's
    dst.execute("DELETE FROM billing.invoice WHERE id = 1")  # cascades to its lines, on the target
    until("the source to follow", lambda: scalar(src, "SELECT count(*) FROM billing.line") == 597)
    split.spec = split.spec.model_copy(update={"drop_source_tables": True})
    drive(split, "finalize", "Finalized")
    assert scalar(src, "SELECT count(*) FROM pg_tables WHERE schemaname = 'billing'") == 0
    assert scalar(dst, "SELECT count(*) FROM billing.line") == 597
    for server, db in zip(servers, databases, strict=True):
        assert replication_objects(server, db) == (0, 0, 0)
    src.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_lock_the_application_holds_gives_way_and_changes_nothing(
    servers: tuple[Postgres, Postgres], databases: tuple[str, str], conns: tuple[Any, Any]
) -> None:
    src, dst = conns
    src.execute("INSERT INTO \"Message\" (body) SELECT 'seed ' || g FROM generate_series(1, 100) g")
    split = make_split(servers, databases, conns, lockBudget={"lockTimeout": "100ms", "retries": 2})
    drive(split, "source", "Replicating")
    with pytest.raises(SpecError) as err:
        advance(split, "finalize")
    assert err.value.reason == "NotCutOver"
    with psycopg.connect(servers[0].dsn(databases[0]), autocommit=True) as other:  # another run of the split
        assert sqls.try_lock(other, split.key)
        with pytest.raises(TransientError) as busy:
            advance(split, "target")
        assert busy.value.reason == "SplitBusy"
    with psycopg.connect(servers[0].dsn(databases[0])) as app:  # a transaction of the application stays open
        app.execute("UPDATE \"Message\" SET body = 'held' WHERE id = 1")
        with pytest.raises(TransientError) as lock:
            advance(split, "target")
        assert lock.value.reason == "LockTimeout" and "lockTimeout 100ms, 2 retries" in lock.value.message
        state = sqls.load_state(src, "pgscale", split.key)
        assert state is not None and (state.step, state.writes_to, state.lock_retries) == ("replicating", "source", 3)
        found = sqls.subscription(dst, split.names.forward)
        assert found is not None and found[1], "the subscription is enabled again"
        assert not sqls.slot_exists(dst, split.names.reverse) and not sqls.guarded(src, ("public", "Message"))
        app.commit()
    report = drive(split, "target", "CutOver")
    assert report.last is not None and report.last.lock_retries == 3
    until("the update to arrive", lambda: scalar(dst, 'SELECT body FROM "Message" WHERE id = 1') == "held")
