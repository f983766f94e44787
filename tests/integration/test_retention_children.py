"""RetentionPolicy and foreign keys, against a real PostgreSQL: no row of any table is lost.

The schema is unlike the sample app on purpose: a non-public schema, text keys, an enum,
`timestamp` without time zone, and every kind of reference to the policy's table: a child
with ON DELETE CASCADE and a grandchild of it, a child with SET NULL, one with RESTRICT,
a self-reference, and a child that is itself partitioned.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import kill_after_batches, run_container, scalar, start_container
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.errors import ReconcileError, SpecError
from pgscale.jobs import JobInput
from pgscale.jobs.retention import run
from pgscale.kube import ObjectRef
from pgscale.pg.connection import ConnInfo
from pgscale.specs import builders

pytestmark = pytest.mark.postgres

SCHEMA = """
CREATE SCHEMA app_data;
CREATE SCHEMA "odd schema";
CREATE TYPE app_data.state AS ENUM ('OPEN', 'DONE');
CREATE TABLE app_data."Task" (
  id text PRIMARY KEY, state app_data.state NOT NULL, "doneAt" timestamp,
  "parentId" text REFERENCES app_data."Task" (id) ON DELETE CASCADE, title text);
CREATE INDEX ON app_data."Task" ("parentId");
CREATE TABLE app_data."Message" (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  "taskId" text NOT NULL REFERENCES app_data."Task" (id) ON DELETE CASCADE, body text);
CREATE INDEX ON app_data."Message" ("taskId");
CREATE TABLE "odd schema"."Re""action" (
  id bigserial PRIMARY KEY, "messageId" bigint NOT NULL REFERENCES app_data."Message" (id) ON DELETE CASCADE,
  emoji text);
CREATE TABLE app_data."File" (
  id text PRIMARY KEY, "taskId" text REFERENCES app_data."Task" (id) ON DELETE SET NULL, name text);
CREATE TABLE app_data."Invoice" (
  id integer PRIMARY KEY, "taskId" text NOT NULL REFERENCES app_data."Task" (id) ON DELETE RESTRICT);
CREATE TABLE app_data."Event" (
  id bigint NOT NULL, at timestamptz NOT NULL,
  "taskId" text REFERENCES app_data."Task" (id) ON DELETE CASCADE, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE app_data."Event_old" PARTITION OF app_data."Event" FOR VALUES FROM ('2000-01-01') TO ('2026-01-01');
CREATE TABLE app_data."Event_new" PARTITION OF app_data."Event" FOR VALUES FROM ('2026-01-01') TO (MAXVALUE);
"""

SEED = """
INSERT INTO app_data."Task" (id, state, "doneAt", title)
  SELECT 't' || g, CASE WHEN g % 4 = 0 THEN 'OPEN' ELSE 'DONE' END::app_data.state,
         CASE WHEN g % 4 = 0 THEN NULL ELSE now()::timestamp - (g % 400 || ' days')::interval END, 'task ' || g
  FROM generate_series(1, {n}) g;
-- subtasks: every 10th task has two, young and open (they go with their parent or keep it)
INSERT INTO app_data."Task" (id, state, "doneAt", "parentId", title)
  SELECT 's' || g || '-' || k, 'OPEN', NULL, 't' || g, 'sub'
  FROM generate_series(10, {n}, 10) g, generate_series(1, 2) k;
INSERT INTO app_data."Message" ("taskId", body)
  SELECT 't' || g, 'm' || k FROM generate_series(1, {n}) g, generate_series(1, 3) k;
INSERT INTO "odd schema"."Re""action" ("messageId", emoji) SELECT id, ':)' FROM app_data."Message" WHERE id % 2 = 0;
INSERT INTO app_data."File" (id, "taskId", name) SELECT 'f' || g, 't' || g, 'x' FROM generate_series(1, {n}, 3) g;
INSERT INTO app_data."Invoice" (id, "taskId") SELECT g, 't' || g FROM generate_series(7, {n}, 50) g;
INSERT INTO app_data."Event" (id, at, "taskId") SELECT g, '2025-06-01'::timestamptz + (g || ' min')::interval, 't' || g
  FROM generate_series(1, {n}, 2) g;
"""

TABLES = ["Task", "Message", "Reaction", "File", "Invoice", "Event"]
SCHEMAS = {"Reaction": ("odd schema", 'Re"action')}  # a hostile name, found through the catalog only
REACTION = 'odd schema.Re"action'

BASE: dict[str, Any] = {
    "profileRef": {"name": "app"},
    "table": {"schema": "app_data", "name": "Task"},
    "ageColumn": "doneAt",
    "olderThan": "90d",
    "filters": [{"column": "state", "operator": "Equals", "values": ["DONE"]}],
    "batchSize": 50,
    "maxBatchSize": 400,
}
OLD = """state = 'DONE' AND "doneAt" < (now() AT TIME ZONE 'UTC') - interval '90 days'"""


def job_for(postgres: Any, database: str, **spec: Any) -> JobInput:
    conn = ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )
    return JobInput("ns", "trim", {**BASE, **spec}, "pgscale", conn)


def table_rows(conn: psycopg.Connection, table: str) -> dict[Any, tuple[Any, ...]]:
    """Rows by primary key (Event: (id, at)); an absent table has none."""
    base, suffix = (table[: -len("_archive")], "_archive") if table.endswith("_archive") else (table, "")
    schema, name = SCHEMAS.get(base, ("app_data", base))
    name += suffix
    if scalar(conn, "SELECT to_regclass(%s)", (sql.Identifier(schema, name).as_string(conn),)) is None:
        return {}
    key = sql.SQL("(id, at)" if table.startswith("Event") else "id")
    cur = conn.execute(sql.SQL("SELECT {}, * FROM {}").format(key, sql.Identifier(schema, name)))
    return {r[0]: r[1:] for r in cur.fetchall()}


def snapshot(conn: psycopg.Connection) -> dict[str, dict[Any, tuple[Any, ...]]]:
    return {t: table_rows(conn, t) for t in TABLES}


@pytest.fixture
def conn(postgres: Any, database: str) -> Any:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        c.execute(SCHEMA)
        c.execute(SEED.format(n=2000))
        yield c


def assert_union_is_original(conn: psycopg.Connection, before: dict[str, dict[Any, Any]]) -> None:
    """Every row of every table is, unchanged, in exactly one of the table and its archive."""
    for table in TABLES:
        now, archived = table_rows(conn, table), table_rows(conn, f"{table}_archive")
        assert not set(now) & set(archived), f"{table}: rows in both the table and the archive"
        assert {**now, **archived} == before[table], f"{table}: rows lost or changed"


def test_no_children_setting_stalls_naming_every_constraint(postgres: Any, database: str, conn: Any) -> None:
    before = snapshot(conn)
    with pytest.raises(SpecError) as caught:
        run(job_for(postgres, database))
    err = caught.value
    assert err.reason == "ReferencedByForeignKeys" and err.field == "children.mode"
    for name in ("Task_parentId_fkey", "Message_taskId_fkey", "File_taskId_fkey", "Event_taskId_fkey"):
        assert name in err.message
    assert "ON DELETE CASCADE" in err.message and "ON DELETE SET NULL" in err.message
    assert "Invoice" not in err.message  # RESTRICT never deletes anything: its parents are only skipped
    assert snapshot(conn) == before  # nothing changed
    assert scalar(conn, 'SELECT to_regclass(\'"app data"."Task_archive"\')') is None


def test_archive_moves_children_with_their_parents(postgres: Any, database: str, conn: Any) -> None:
    before = snapshot(conn)
    old = {r[0] for r in conn.execute(f'SELECT id FROM app_data."Task" WHERE {OLD}').fetchall()}
    invoiced = {r[0] for r in conn.execute('SELECT "taskId" FROM app_data."Invoice"').fetchall()}
    report = run(job_for(postgres, database, children={"mode": "archive"}))
    assert report.outcome == "Succeeded", report.message
    assert_union_is_original(conn, before)
    archived_tasks = set(table_rows(conn, "Task_archive"))
    moved_parents = old - invoiced
    subtasks = {i for i, r in before["Task"].items() if r[3] in moved_parents}
    assert archived_tasks == moved_parents | subtasks  # subtasks (self-reference) go with their parent
    assert set(table_rows(conn, "Task")) >= invoiced  # RESTRICT: those parents stay
    # Every archived child points at an archived parent; no remaining child at a missing one.
    for table in ("Message", "File", "Event"):
        kept = {r[1] for r in conn.execute(f'SELECT id, "taskId" FROM app_data."{table}"').fetchall()}
        assert not kept & archived_tasks
    counts = json.loads(json.dumps(report.tables))
    assert counts["app_data.Message archived"] == len(table_rows(conn, "Message_archive"))
    assert counts[f"{REACTION} archived"] == len(table_rows(conn, "Reaction_archive"))
    assert counts["app_data.File archived"] == len(table_rows(conn, "File_archive"))
    assert counts["app_data.Event archived"] == len(table_rows(conn, "Event_archive"))
    assert counts["skipped: Invoice_taskId_fkey"] == len(old & invoiced)
    log = conn.execute("SELECT rows_archived, tables FROM pgscale.retention_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert log[0] == len(archived_tasks) and log[1] == report.tables
    again = run(job_for(postgres, database, children={"mode": "archive"}))
    assert again.rows_archived == 0 and again.outcome == "Succeeded"


def test_delete_lets_children_go_and_counts_them(postgres: Any, database: str, conn: Any) -> None:
    before = snapshot(conn)
    report = run(job_for(postgres, database, children={"mode": "delete"}))
    assert report.outcome == "Succeeded", report.message
    after = snapshot(conn)
    archived = table_rows(conn, "Task_archive")
    assert {**after["Task"], **archived}.keys() <= before["Task"].keys()
    # Subtasks share their parent's fate (the policy archives): a self-reference never deletes.
    assert {**after["Task"], **archived} == before["Task"]
    assert any(key.startswith("s") for key in archived)
    for table, label in (("Message", "app_data.Message"), ("Reaction", REACTION), ("Event", "app_data.Event")):
        assert report.tables[f"{label} deleted"] == len(before[table]) - len(after[table])
    nulled = [i for i, r in after["File"].items() if r[1] is None and before["File"][i][1] is not None]
    assert report.tables["app_data.File setNull"] == len(nulled) > 0
    # Rows that were not children of a removed task are untouched.
    for table in ("Message", "File", "Invoice"):
        for key, row in after[table].items():
            if table != "File" or row[1] is not None:
                assert row == before[table][key]


def test_keep_skips_parents_with_children_and_touches_no_child(postgres: Any, database: str, conn: Any) -> None:
    conn.execute("INSERT INTO app_data.\"Task\" (id, state, \"doneAt\") VALUES ('lonely', 'DONE', '2020-01-01')")
    before = snapshot(conn)
    report = run(job_for(postgres, database, children={"mode": "keep"}))
    assert report.outcome == "Succeeded", report.message
    assert set(table_rows(conn, "Task_archive")) == {"lonely"}  # the only old task without children
    for table in TABLES[1:]:
        assert table_rows(conn, table) == before[table]
    assert report.tables["skipped: Message_taskId_fkey"] > 0
    assert_union_is_original(conn, before)


def test_mixed_modes_per_table(postgres: Any, database: str, conn: Any) -> None:
    before = snapshot(conn)
    children = {
        "mode": "archive",
        "tables": [
            {"schema": "app_data", "name": "File", "mode": "delete"},
            {"schema": "app_data", "name": "Message", "mode": "archive", "archiveTable": "Message_history"},
        ],
    }
    report = run(job_for(postgres, database, children=children))
    assert report.outcome == "Succeeded", report.message
    assert table_rows(conn, "Message_archive") == {}
    assert len(table_rows(conn, "Message_history")) == report.tables["app_data.Message archived"] > 0
    assert report.tables["app_data.File setNull"] > 0
    files = table_rows(conn, "File")
    assert files.keys() == before["File"].keys()  # SET NULL keeps the rows


def test_pg_cron_procedure_moves_children_too(postgres: Any, database: str, conn: Any) -> None:
    """The procedure pg_cron calls runs the same statement, with the children, in REPEATABLE READ."""
    from pgscale.pg import retention as sqlr

    before = snapshot(conn)
    job = job_for(postgres, database, children={"mode": "archive"}, dryRun=True)
    run(job)  # creates the archive tables and the run log
    from pgscale.api.retentionpolicy import RetentionPolicySpec
    from pgscale.retention import prepare

    prepared = prepare(conn, RetentionPolicySpec.model_validate(job.spec), "pgscale")
    sqlr.ensure_procedure(conn, "pgscale")
    sqlr.save_config(
        conn,
        "pgscale",
        "ns/cron",
        prepared.target,
        dry_run=False,
        lock_timeout="1s",
        row_lock_wait="100ms",
        statement_timeout="60s",
        max_run="1 hour",
        pause=0.0,
    )
    conn.execute("""CALL pgscale.retention_run('ns/cron')""")
    row = conn.execute(
        "SELECT outcome, rows_archived, tables FROM pgscale.retention_runs WHERE policy = 'ns/cron'"
    ).fetchone()
    assert row[0] == "Succeeded" and row[1] > 0, row
    assert row[2]["app_data.Message archived"] == len(table_rows(conn, "Message_archive")) > 0
    assert_union_is_original(conn, before)


class ChildWriter(threading.Thread):
    """The application: adds messages (and reactions) to random tasks, old ones included, and
    remembers every one whose insert committed."""

    def __init__(self, dsn: str, tasks: list[str]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.tasks = dsn, tasks
        self.stop = threading.Event()
        self.committed: dict[int, str] = {}
        self.refused = 0
        self.rng = random.Random(11)

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while not self.stop.is_set() and time.monotonic() < deadline:
                task = self.rng.choice(self.tasks)
                try:
                    with conn.transaction():
                        row = conn.execute(
                            'INSERT INTO app_data."Message" ("taskId", body) VALUES (%s, %s) RETURNING id',
                            (task, "live"),
                        ).fetchone()
                        assert row is not None
                        conn.execute(
                            'INSERT INTO "odd schema"."Re""action" ("messageId", emoji) VALUES (%s, %s)', (row[0], "!")
                        )
                    self.committed[row[0]] = task
                except psycopg.errors.ForeignKeyViolation:
                    self.refused += 1  # its task was archived first: the application sees an error, nothing is lost


def test_concurrent_child_inserts_lose_nothing(postgres: Any, database: str, conn: Any) -> None:
    old = [r[0] for r in conn.execute(f'SELECT id FROM app_data."Task" WHERE {OLD}').fetchall()]
    writer = ChildWriter(postgres.dsn(database), old)
    writer.start()
    time.sleep(0.3)
    report = run(job_for(postgres, database, children={"mode": "archive"}, batchSize=20, maxBatchSize=20))
    time.sleep(0.2)
    writer.stop.set()
    writer.join()
    assert report.outcome == "Succeeded", report.message
    messages, archived = table_rows(conn, "Message"), table_rows(conn, "Message_archive")
    tasks, archived_tasks = table_rows(conn, "Task"), table_rows(conn, "Task_archive")
    assert len(writer.committed) > 50
    for mid, task in writer.committed.items():
        if mid in messages:
            assert task in tasks, f"message {mid} kept, its task {task} is not"
        else:
            assert mid in archived and task in archived_tasks, f"message {mid} of {task} lost"
    reactions = set(table_rows(conn, "Reaction")) | set(table_rows(conn, "Reaction_archive"))
    assert len(reactions) == scalar(conn, 'SELECT last_value FROM "odd schema"."Re""action_id_seq"')
    print(
        f"\nchildren: {len(writer.committed)} messages inserted during the run ({writer.refused} refused: "
        f"their task had gone), {report.rows_archived} tasks archived; lost 0"
    )


def test_killed_job_resumes_and_loses_nothing_in_any_table(postgres: Any, database: str, conn: Any) -> None:
    """SIGKILL `pgscale job retention` (as its pod runs it) at random batches, then let it finish."""
    before = snapshot(conn)
    owner = ObjectRef("pgscale.io/v1alpha1", "RetentionPolicy", "ns", "trim", "uid")
    profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}})
    spec = {**BASE, "batchSize": 10, "maxBatchSize": 10, "children": {"mode": "archive"}}
    cron = builders.cron_job(
        owner,
        suffix="retention",
        schedule="@daily",
        time_zone="UTC",
        suspend=False,
        args=builders.job_args("retention", owner),
        template=None,
        default_image="pgscale",
        env=builders.job_env(owner, spec, profile),
    )
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    secrets = {"app-db": {"uri": postgres.uri(database)}}
    rng = random.Random(5)
    last_id = 0
    for _ in range(4):
        proc = start_container(pod, secrets)
        last_id = kill_after_batches(proc, conn, last_id, rng.randint(2, 12))
    final = run_container(pod, secrets)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout.strip().splitlines()[-1])["outcome"] == "Succeeded"
    assert_union_is_original(conn, before)
    assert scalar(conn, "SELECT count(*) FROM pgscale.retention_runs WHERE outcome = 'Failed'") == 4


def test_a_role_without_superuser_gets_the_grants_it_lacks(postgres: Any, database: str, conn: Any) -> None:
    """An application role that owns nothing but its grants: told exactly what to grant, then it runs."""
    role = f"app_{database[-6:]}"
    conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    conn.execute(f'GRANT USAGE, CREATE ON SCHEMA app_data, "odd schema" TO {role}')
    conn.execute(f"GRANT CREATE ON DATABASE {database} TO {role}")
    conn.execute(
        f'GRANT SELECT, INSERT, DELETE ON app_data."Task", app_data."File", app_data."Invoice", '
        f'app_data."Event" TO {role}'
    )
    before = snapshot(conn)
    job = job_for(postgres, database, children={"mode": "archive"})
    job = JobInput(
        job.namespace,
        job.name,
        job.spec,
        "pgscale_app",
        ConnInfo(host=postgres.host, port=postgres.port, dbname=database, user=role, password=f"pw-{role}"),
    )
    with pytest.raises(ReconcileError) as caught:
        run(job)
    assert caught.value.reason == "InsufficientPrivilege"
    assert f'GRANT DELETE, SELECT ON "app_data"."Message" TO "{role}"' in caught.value.message
    assert f'GRANT DELETE, SELECT ON "odd schema"."Re""action" TO "{role}"' in caught.value.message
    assert f'GRANT UPDATE ON "app_data"."Task" TO "{role}"' in caught.value.message  # FOR UPDATE needs it
    assert "File" not in caught.value.message and "Invoice" not in caught.value.message
    assert snapshot(conn) == before
    conn.execute(f'GRANT SELECT, DELETE ON app_data."Message", "odd schema"."Re""action" TO {role}')
    conn.execute(f'GRANT UPDATE ON app_data."Task" TO {role}')
    report = run(job)
    assert report.outcome == "Succeeded" and report.rows_archived > 0, report.message
    assert_union_is_original(conn, before)
