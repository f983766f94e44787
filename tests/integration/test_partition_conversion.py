"""Converting a live "Task" table into monthly partitions against a real PostgreSQL.

Online (a writer inserts, updates and deletes throughout and every change survives),
exact (the final rows equal the writer's own account of them), complete (keys,
indexes, identity, comments, grants kept), resumable (the job as its pod runs it is
SIGKILLed at every step and rerun), and refusing what it cannot do without changing
anything.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from conftest import run_container, scalar, seed_tasks
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.api.partitionpolicy import PartitionPolicySpec
from pgscale.conversion import convert
from pgscale.errors import SpecError
from pgscale.kube import ObjectRef
from pgscale.specs import builders
from writers import Writer, expected, fingerprint, rows

pytestmark = pytest.mark.postgres

SPEC: dict[str, Any] = {
    "profileRef": {"name": "app"},
    "table": {"name": "Task"},
    "column": "createdAt",
    "interval": "monthly",
    "premake": 3,
    "conversion": {"batchSize": 500, "widenKeys": True, "dropReferencingForeignKeys": True},
}


@pytest.fixture
def conn(postgres: Any, database: str) -> Any:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        yield c


def test_blocked_conversion_changes_nothing(conn: psycopg.Connection) -> None:
    """The sample schema as it is: the key lacks createdAt and Message references Task."""
    seed_tasks(conn, 200)
    before = fingerprint(conn)
    spec = PartitionPolicySpec.model_validate({**SPEC, "conversion": {"widenKeys": False}})
    with pytest.raises(SpecError) as err:
        convert(conn, spec, "pgscale", datetime.now(UTC))
    message = err.value.message
    assert err.value.reason == "ConversionBlocked" and err.value.field == "conversion"
    assert "primary key 'Task_pkey' (id) lacks the partition column 'createdAt'" in message
    assert "widenKeys: true" in message
    assert "'Message_taskId_fkey' on public.\"Message\"" in message and "dropReferencingForeignKeys" in message
    assert "nothing was changed" in message
    assert fingerprint(conn) == before
    assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "r"
    triggers = "SELECT count(*) FROM pg_trigger WHERE tgrelid = '\"Task\"'::regclass AND NOT tgisinternal"
    assert scalar(conn, triggers) == 0
    assert scalar(conn, "SELECT to_regclass('\"Task_pgscale_new\"')") is None
    assert scalar(conn, "SELECT count(*) FROM pg_class WHERE relname LIKE 'Task\\_2%'") == 0  # no partitions
    assert scalar(conn, "SELECT to_regclass('pgscale.partition_conversions')") is None


def test_views_and_unique_indexes_block_with_the_fix(conn: psycopg.Connection) -> None:
    conn.execute('CREATE VIEW "OpenTasks" AS SELECT * FROM "Task" WHERE status = \'PENDING\'')
    conn.execute('CREATE UNIQUE INDEX "Task_title_key" ON "Task" (title)')
    with pytest.raises(SpecError) as err:
        convert(conn, PartitionPolicySpec.model_validate(SPEC), "pgscale", datetime.now(UTC))
    assert 'views depend on "public"."Task" (public."OpenTasks")' in err.value.message
    assert "unique index 'Task_title_key' lacks the partition column" in err.value.message


def test_online_conversion_keeps_every_row_and_change(conn: psycopg.Connection, postgres: Any, database: str) -> None:
    seed_tasks(conn, 20000)
    conn.execute("DROP ROLE IF EXISTS task_reader")
    conn.execute("CREATE ROLE task_reader")
    conn.execute('GRANT SELECT ON "Task" TO task_reader')
    conn.execute("COMMENT ON COLUMN \"Task\".title IS 'What to do'")
    before = rows(conn)
    writer = Writer(postgres.dsn(database), list(before))
    writer.start()
    time.sleep(0.3)
    spec = PartitionPolicySpec.model_validate(SPEC)
    try:
        report = convert(conn, spec, "pgscale", datetime.now(UTC))
        time.sleep(0.3)  # writes go on against the partitioned table
    finally:
        writer.stop.set()
        writer.join(10)
    assert report.finished and report.phase == "done", report
    assert not writer.errors, writer.errors[:5]
    assert writer.ops > 200
    want = expected(before, writer)
    got = rows(conn)
    assert len(got) == len(want) and got == want, "rows differ from what the writer committed"
    # Partitioned, every month of the data plus three ahead, and the DEFAULT partition.
    assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "p"
    months = {
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = '\"Task\"'::regclass"
        ).fetchall()
    }
    now = datetime.now(UTC)
    assert f"Task_{now:%Y_%m}" in months and "Task_default" in months and len(months) >= 25 + 3 + 1
    assert scalar(conn, 'SELECT count(*) FROM "Task_default"') == 0
    # Keys, indexes, identity, comments, grants.
    assert scalar(conn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'Task_pkey'") == (
        'PRIMARY KEY (id, "createdAt")'
    )
    assert (
        scalar(conn, "SELECT indrelid::regclass::text FROM pg_index WHERE indexrelid = '\"Task_status_idx\"'::regclass")
        == '"Task"'
    )
    assert scalar(conn, "SELECT obj_description('\"Task\"'::regclass, 'pg_class')").startswith("Work items")
    assert scalar(conn, "SELECT col_description('\"Task\"'::regclass, 2)") == "What to do"
    assert scalar(conn, "SELECT has_table_privilege('task_reader', '\"Task\"', 'SELECT')") is True
    assert scalar(conn, """SELECT pg_get_serial_sequence('"Task"', 'id')""") == 'public."Task_id_seq"'
    top = max(got)
    new_id = scalar(conn, "INSERT INTO \"Task\" (title) VALUES ('after') RETURNING id")
    assert new_id > top
    # Old table, trigger functions and the referencing foreign key are gone; the state says done.
    assert scalar(conn, "SELECT to_regclass('\"Task_pgscale_old\"')") is None
    assert scalar(conn, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'partition_sync%'") == 0
    assert scalar(conn, "SELECT count(*) FROM pg_constraint WHERE conname = 'Message_taskId_fkey'") == 0
    assert scalar(conn, "SELECT phase FROM pgscale.partition_conversions") == "done"
    # A month's range prunes to one partition.
    plan = "\n".join(
        r[0]
        for r in conn.execute(
            """EXPLAIN SELECT count(*) FROM "Task" WHERE "createdAt" >= date_trunc('month', now() AT TIME ZONE 'UTC')
           AT TIME ZONE 'UTC' - interval '2 months' AND "createdAt" < date_trunc('month', now() AT TIME ZONE 'UTC')
           AT TIME ZONE 'UTC' - interval '1 month'"""
        ).fetchall()
    )
    scanned = {line.split(" on ")[1].split()[0] for line in plan.splitlines() if " on " in line and "Scan" in line}
    assert len(scanned) == 1 or "Subplans Removed" in plan, plan
    assert report.longest_lock_ms < 1000


FAULT_POINTS = [
    "after-build",
    "after-prepare",
    "copy-batch-2",
    "after-copy",
    "after-verify",
    "swap-before-commit",
    "after-swap",
]


def test_killed_at_every_step_resumes_exactly(conn: psycopg.Connection, postgres: Any, database: str) -> None:
    """`pgscale job partition-maintenance`, as its pod runs it, SIGKILLed at each step and run again."""
    seed_tasks(conn, 5000)
    before = fingerprint(conn)
    owner = ObjectRef("pgscale.io/v1alpha1", "PartitionPolicy", "ns", "task-by-month", "uid")
    profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}})
    cron = builders.cron_job(
        owner,
        suffix="partition-maintenance",
        schedule="@hourly",
        time_zone="UTC",
        suspend=False,
        args=builders.job_args("partition-maintenance", owner),
        template=None,
        default_image="pgscale",
        env=builders.job_env(owner, SPEC, profile),
    )
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    secrets = {"app-db": {"uri": postgres.uri(database)}}
    phases = []
    for point in FAULT_POINTS:
        container = pod["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "PGSCALE_FAULT_POINT"]
        container["env"].append({"name": "PGSCALE_FAULT_POINT", "value": point})
        result = run_container(pod, secrets)
        assert result.returncode == -9, (point, result.stderr[-2000:])  # SIGKILLed where asked
        phases.append(scalar(conn, "SELECT phase FROM pgscale.partition_conversions"))
        assert fingerprint(conn) == before, f"rows differ after a kill at {point}"
    assert phases == ["building", "prepared", "prepared", "copied", "verified", "verified", "swapped"]
    pod["containers"][0]["env"] = [e for e in pod["containers"][0]["env"] if e["name"] != "PGSCALE_FAULT_POINT"]
    final = run_container(pod, secrets)
    assert final.returncode == 0, final.stderr[-2000:]
    report = json.loads(final.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "Succeeded" and report["conversion"]["phase"] == "done", report
    assert fingerprint(conn) == before
    assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "p"
    assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgscale%'") == 0


def test_application_role_without_delete_keeps_writing_during_conversion(
    conn: psycopg.Connection, postgres: Any, database: str
) -> None:
    """The sync trigger runs as its owner: the application's role needs no privilege on the copy."""
    seed_tasks(conn, 300)
    conn.execute("DROP ROLE IF EXISTS app_writer")
    conn.execute("CREATE ROLE app_writer LOGIN PASSWORD 'w'")
    conn.execute('GRANT SELECT, UPDATE, INSERT ON "Task" TO app_writer')
    spec = PartitionPolicySpec.model_validate(SPEC)
    report = convert(conn, spec, "pgscale", datetime.now(UTC), budget=0)
    assert report.phase == "prepared"
    dsn = (
        postgres.dsn(database)
        .replace("user=postgres", "user=app_writer")
        .replace(f"password={postgres.PASSWORD}", "password=w")
    )
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("""UPDATE "Task" SET title = 'by the app' WHERE id = 1""")
        app.execute("""INSERT INTO "Task" (title) VALUES ('new from the app')""")
    assert convert(conn, spec, "pgscale", datetime.now(UTC)).finished
    assert scalar(conn, """SELECT title FROM "Task" WHERE id = 1""") == "by the app"
    assert scalar(conn, """SELECT count(*) FROM "Task" WHERE title = 'new from the app'""") == 1


def test_an_index_added_mid_conversion_restarts_it(conn: psycopg.Connection) -> None:
    from pgscale.errors import TransientError

    seed_tasks(conn, 300)
    spec = PartitionPolicySpec.model_validate(SPEC)
    convert(conn, spec, "pgscale", datetime.now(UTC), budget=0)
    conn.execute("""CREATE INDEX "Task_user_idx" ON "Task" ("userId")""")
    with pytest.raises(TransientError) as err:
        convert(conn, spec, "pgscale", datetime.now(UTC))
    assert err.value.reason == "ConversionRestarted" and "Task_user_idx" in err.value.message
    assert scalar(conn, """SELECT to_regclass('"Task_pgscale_new"')""") is None  # the copy was dropped
    assert convert(conn, spec, "pgscale", datetime.now(UTC)).finished
    assert (
        scalar(
            conn,
            """SELECT indrelid::regclass::text FROM pg_index
                           WHERE indexrelid = '"Task_user_idx"'::regclass""",
        )
        == '"Task"'
    )


def test_a_view_added_mid_conversion_holds_the_switch_until_dropped(conn: psycopg.Connection) -> None:
    seed_tasks(conn, 300)
    before = fingerprint(conn)
    spec = PartitionPolicySpec.model_validate(SPEC)
    convert(conn, spec, "pgscale", datetime.now(UTC), budget=0)
    conn.execute("""CREATE VIEW "Recent" AS SELECT * FROM "Task" WHERE id > 100""")
    with pytest.raises(SpecError) as err:
        convert(conn, spec, "pgscale", datetime.now(UTC))
    assert err.value.reason == "ConversionBlocked" and "changed during the conversion" in err.value.message
    assert "Recent" in err.value.message
    assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "r"
    conn.execute('DROP VIEW "Recent"')
    assert convert(conn, spec, "pgscale", datetime.now(UTC)).finished
    assert fingerprint(conn) == before


def test_key_options_are_kept_or_refused(conn: psycopg.Connection) -> None:
    conn.execute("""CREATE TABLE "Note" (id bigint, "createdAt" timestamptz NOT NULL, body text,
                    CONSTRAINT "Note_pkey" PRIMARY KEY (id, "createdAt") INCLUDE (body))""")
    conn.execute("""CREATE TABLE "Tag" (id bigint, name text, "createdAt" timestamptz NOT NULL,
                    PRIMARY KEY (id) INCLUDE (name))""")
    conn.execute("""INSERT INTO "Note" VALUES (1, now(), 'x')""")
    note = PartitionPolicySpec.model_validate({**SPEC, "table": {"name": "Note"}})
    assert convert(conn, note, "pgscale", datetime.now(UTC)).finished
    assert scalar(conn, "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'Note_pkey'") == (
        'PRIMARY KEY (id, "createdAt") INCLUDE (body)'
    )
    tag = PartitionPolicySpec.model_validate({**SPEC, "table": {"name": "Tag"}})
    with pytest.raises(SpecError, match=r"has options .* that pgscale does not widen"):
        convert(conn, tag, "pgscale", datetime.now(UTC))
    conn.execute("""CREATE TABLE "Pin" (id bigint, "createdAt" timestamptz NOT NULL,
                    PRIMARY KEY (id, "createdAt") DEFERRABLE)""")
    pin = PartitionPolicySpec.model_validate({**SPEC, "table": {"name": "Pin"}})
    with pytest.raises(SpecError, match="is DEFERRABLE"):
        convert(conn, pin, "pgscale", datetime.now(UTC))


def _until_switch(conn: psycopg.Connection, spec: PartitionPolicySpec) -> None:
    """Copy and verify; the switch gives way (an application transaction holds the table)."""
    from pgscale.errors import TransientError

    with pytest.raises(TransientError, match="could not lock the table"):
        convert(conn, spec, "pgscale", datetime.now(UTC))
    assert scalar(conn, "SELECT phase FROM pgscale.partition_conversions") == "verified"


def test_repeatable_read_writers_lose_nothing(conn: psycopg.Connection, postgres: Any, database: str) -> None:
    """A REPEATABLE READ transaction whose snapshot predates the copy deletes and moves rows afterwards."""
    seed_tasks(conn, 500)
    spec = PartitionPolicySpec.model_validate(
        {**SPEC, "conversion": {**SPEC["conversion"], "lockTimeout": "100ms", "maxRetries": 0}}
    )
    assert convert(conn, spec, "pgscale", datetime.now(UTC), budget=0).phase == "prepared"
    with psycopg.connect(postgres.dsn(database)) as app:
        app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        app.execute('SELECT count(*) FROM "Task"')  # the snapshot is taken now, before the copy
        _until_switch(conn, spec)
        app.execute('DELETE FROM "Task" WHERE id = 1')
        app.execute("""UPDATE "Task" SET "createdAt" = "createdAt" - interval '40 days' WHERE id = 3""")
        app.execute("""UPDATE "Task" SET title = 'rr' WHERE id = 4""")
        app.commit()
    expected_rows = rows(conn)
    assert convert(conn, spec, "pgscale", datetime.now(UTC)).finished
    assert rows(conn) == expected_rows
    assert scalar(conn, 'SELECT count(*) FROM "Task" WHERE id = 1') == 0
    assert scalar(conn, 'SELECT count(*) FROM "Task" WHERE id = 3') == 1


def test_writes_of_replication_sessions_are_followed(conn: psycopg.Connection, postgres: Any, database: str) -> None:
    """session_replication_role = replica (logical replication apply, pg_restore) skips ordinary triggers."""
    seed_tasks(conn, 300)
    spec = PartitionPolicySpec.model_validate(SPEC)
    convert(conn, spec, "pgscale", datetime.now(UTC), budget=0)
    with psycopg.connect(postgres.dsn(database), autocommit=True) as replica:
        replica.execute("SET session_replication_role = replica")
        replica.execute("""UPDATE "Task" SET title = 'applied' WHERE id = 2""")
        replica.execute("""INSERT INTO "Task" (title) VALUES ('replicated')""")
    before = rows(conn)
    assert convert(conn, spec, "pgscale", datetime.now(UTC)).finished
    assert rows(conn) == before


def test_sequence_set_with_is_called_false_continues_exactly(conn: psycopg.Connection) -> None:
    seed_tasks(conn, 100)
    conn.execute("""SELECT setval(pg_get_serial_sequence('"Task"', 'id'), 5000, false)""")
    assert convert(conn, PartitionPolicySpec.model_validate(SPEC), "pgscale", datetime.now(UTC)).finished
    assert scalar(conn, """INSERT INTO "Task" (title) VALUES ('next') RETURNING id""") == 5000


def test_a_key_changed_during_the_copy_moves_no_cursor(conn: psycopg.Connection) -> None:
    seed_tasks(conn, 2000)
    spec = PartitionPolicySpec.model_validate(SPEC)
    convert(conn, spec, "pgscale", datetime.now(UTC), budget=0)
    conn.execute('UPDATE "Task" SET id = 100000 WHERE id = 150')
    before = fingerprint(conn)
    assert convert(conn, spec, "pgscale", datetime.now(UTC)).finished
    assert fingerprint(conn) == before
