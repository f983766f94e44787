"""RetentionPolicy against the schema shapes a review used to lose rows: each case once lost or changed
a row, or never finished; each must now keep every row of every table (in the table or its archive)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import sql

from conftest import scalar
from pgscale.errors import ReconcileError
from pgscale.jobs import JobInput
from pgscale.jobs.retention import run
from pgscale.pg.connection import ConnInfo

pytestmark = pytest.mark.postgres

OLD = "now() - interval '200 days'"


def job(postgres: Any, database: str, user: str = "postgres", password: str | None = None, **spec: Any) -> JobInput:
    body = {
        "profileRef": {"name": "app"},
        "table": {"name": "task"},
        "ageColumn": "done",
        "olderThan": "90d",
        "batchSize": 5,
        "maxBatchSize": 5,
        **spec,
    }
    info = ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user=user, password=password or postgres.PASSWORD
    )
    return JobInput("ns", "p", body, "pgscale", info)


def everything(conn: psycopg.Connection, *tables: str) -> dict[str, set[tuple[Any, ...]]]:
    """Every row of each table and its archive, as one set per table (where a row lives does not matter)."""
    out = {}
    for table in tables:
        rows: set[tuple[Any, ...]] = set()
        for name in (table, f"{table}_archive"):
            kind = scalar(conn, "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (name,))
            if kind is not None:
                only = sql.SQL("" if kind == "p" else "ONLY ")  # a partitioned table's rows are in its partitions
                rows |= set(conn.execute(sql.SQL("SELECT * FROM {}{}").format(only, sql.Identifier(name))).fetchall())
        out[table] = rows
    return out


@pytest.fixture
def conn(postgres: Any, database: str) -> Any:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        yield c


def test_a_kept_child_deep_below_a_self_reference_keeps_the_whole_family(
    postgres: Any, database: str, conn: Any
) -> None:
    conn.execute(f"""CREATE TABLE task (id int PRIMARY KEY, done timestamptz,
                                        parent int REFERENCES task ON DELETE CASCADE);
        CREATE TABLE msg (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE);
        INSERT INTO task VALUES (1, {OLD}, NULL), (2, now(), 1), (3, now(), 2), (4, {OLD}, NULL), (5, now(), 4);
        INSERT INTO msg VALUES (10, 3)""")
    before = everything(conn, "task", "msg")
    report = run(job(postgres, database, children={"mode": "archive", "tables": [{"name": "msg", "mode": "keep"}]}))
    assert report.outcome == "Succeeded", report.message
    assert everything(conn, "task", "msg") == before
    assert {r[0] for r in conn.execute("SELECT id FROM task")} == {1, 2, 3}  # the family of msg 10 stays
    assert {r[0] for r in conn.execute("SELECT id FROM task_archive")} == {4, 5}
    assert report.tables["skipped: msg_task_fkey"] == 1


def test_a_self_reference_inside_a_child_table_checks_its_kept_rows(postgres: Any, database: str, conn: Any) -> None:
    conn.execute(f"""CREATE TABLE task (id int PRIMARY KEY, done timestamptz);
        CREATE TABLE msg (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE,
                          reply int REFERENCES msg ON DELETE CASCADE);
        CREATE TABLE react (id int PRIMARY KEY, msg int REFERENCES msg ON DELETE CASCADE);
        INSERT INTO task VALUES (1, {OLD}), (2, now()), (3, {OLD});
        INSERT INTO msg VALUES (10, 1, NULL), (11, 2, 10), (12, 3, NULL);
        INSERT INTO react VALUES (100, 11)""")
    before = everything(conn, "task", "msg", "react")
    report = run(job(postgres, database, children={"mode": "archive", "tables": [{"name": "react", "mode": "keep"}]}))
    assert report.outcome == "Succeeded", report.message
    assert everything(conn, "task", "msg", "react") == before
    assert scalar(conn, "SELECT count(*) FROM react") == 1  # never archived, never cascaded
    assert {r[0] for r in conn.execute("SELECT id FROM task_archive")} == {3}


def test_keys_that_name_a_partition_or_its_parent_are_found(postgres: Any, database: str, conn: Any) -> None:
    conn.execute(f"""CREATE TABLE task (id int, done timestamptz NOT NULL, PRIMARY KEY (id, done))
                       PARTITION BY RANGE (done);
        CREATE TABLE task_old PARTITION OF task FOR VALUES FROM ('2000-01-01') TO ('2026-06-01');
        CREATE TABLE task_new PARTITION OF task FOR VALUES FROM ('2026-06-01') TO (MAXVALUE);
        CREATE TABLE note (id int PRIMARY KEY, task int, at timestamptz,
                           FOREIGN KEY (task, at) REFERENCES task_old (id, done) ON DELETE CASCADE);
        INSERT INTO task VALUES (1, {OLD}), (2, {OLD});
        INSERT INTO note SELECT 10, id, done FROM task WHERE id = 1""")
    before = everything(conn, "task", "note")
    with pytest.raises(ReconcileError) as caught:  # the key names the partition, not the table: found all the same
        run(job(postgres, database, partitionAware=False))
    assert caught.value.reason == "ReferencedByForeignKeys" and '"note_task_at_fkey"' in caught.value.message
    report = run(job(postgres, database, partitionAware=True, children={"mode": "archive"}))
    assert report.outcome == "Succeeded" and report.partitions == [], report  # referenced: row by row
    assert everything(conn, "task", "note") == before and scalar(conn, "SELECT count(*) FROM note_archive") == 1
    # A policy on the partition itself sees keys declared on its parent.
    conn.execute("""CREATE TABLE ev (id int, at timestamptz NOT NULL, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE ev_old PARTITION OF ev FOR VALUES FROM ('2000-01-01') TO ('2026-06-01');
        CREATE TABLE ev_note (id int PRIMARY KEY, ev int, at timestamptz,
                              FOREIGN KEY (ev, at) REFERENCES ev (id, at) ON DELETE CASCADE)""")
    with pytest.raises(ReconcileError) as caught:
        run(job(postgres, database, table={"name": "ev_old"}, ageColumn="at"))
    assert caught.value.reason == "ReferencedByForeignKeys" and '"ev_note_ev_at_fkey"' in caught.value.message


def test_rows_of_inheriting_tables_are_never_touched(postgres: Any, database: str, conn: Any) -> None:
    conn.execute(f"""CREATE TABLE task (id int PRIMARY KEY, done timestamptz);
        CREATE TABLE task_2 (extra text) INHERITS (task);
        INSERT INTO task VALUES (1, {OLD}), (2, now());
        INSERT INTO task_2 VALUES (1, now(), 'young, same ctid as task 1'), (3, {OLD}, 'old, not the policy''s')""")
    report = run(job(postgres, database, action="delete"))
    assert report.outcome == "Succeeded" and report.rows_deleted == 1, report
    assert {r[0] for r in conn.execute("SELECT id FROM ONLY task")} == {2}
    assert {r[0] for r in conn.execute("SELECT id FROM task_2")} == {1, 3}


def test_row_level_security_that_hides_children_refuses(postgres: Any, database: str, conn: Any) -> None:
    role = f"r_{database[-8:]}"
    conn.execute(f"""CREATE TABLE task (id int PRIMARY KEY, done timestamptz);
        CREATE TABLE msg (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE, secret boolean);
        ALTER TABLE msg ENABLE ROW LEVEL SECURITY;
        CREATE POLICY visible ON msg USING (NOT secret);
        INSERT INTO task VALUES (1, {OLD}); INSERT INTO msg VALUES (10, 1, true), (11, 1, false);
        CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}';
        GRANT CREATE ON DATABASE {database} TO {role}; GRANT USAGE, CREATE ON SCHEMA public TO {role};
        GRANT SELECT, UPDATE, DELETE, INSERT ON task, msg TO {role}""")
    before = everything(conn, "task", "msg")
    with pytest.raises(ReconcileError) as caught:
        run(job(postgres, database, user=role, password=f"pw-{role}", children={"mode": "archive"}))
    assert (
        caught.value.reason == "InsufficientPrivilege"
        and 'row-level security on "public"."msg"' in caught.value.message
    )
    assert everything(conn, "task", "msg") == before


def test_a_key_added_after_planning_stops_the_pg_cron_batches(postgres: Any, database: str, conn: Any) -> None:
    from pgscale.api.retentionpolicy import RetentionPolicySpec
    from pgscale.pg import retention as sqlr
    from pgscale.retention import prepare

    conn.execute(f"""CREATE TABLE task (id int PRIMARY KEY, done timestamptz);
        CREATE TABLE msg (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE);
        CREATE TABLE comment (id int PRIMARY KEY, task int);
        INSERT INTO task SELECT g, {OLD} FROM generate_series(1, 20) g;
        INSERT INTO comment SELECT g, g FROM generate_series(1, 20) g""")
    spec = job(postgres, database, children={"mode": "archive"}).spec
    prepared = prepare(conn, RetentionPolicySpec.model_validate(spec), "pgscale")
    sqlr.ensure_procedure(conn, "pgscale")
    sqlr.save_config(
        conn,
        "pgscale",
        "ns/p",
        prepared.target,
        dry_run=False,
        lock_timeout="1s",
        row_lock_wait="100ms",
        statement_timeout="60s",
        max_run="1 hour",
        pause=0.0,
    )
    conn.execute("ALTER TABLE comment ADD FOREIGN KEY (task) REFERENCES task ON DELETE CASCADE")  # a migration
    conn.execute("CALL pgscale.retention_run('ns/p')")
    outcome, message = conn.execute(
        "SELECT outcome, message FROM pgscale.retention_runs WHERE policy = 'ns/p'"
    ).fetchone()
    assert outcome == "Failed" and "foreign keys into the tables this policy moves changed" in message
    assert scalar(conn, "SELECT count(*) FROM comment") == 20 and scalar(conn, "SELECT count(*) FROM task") == 20


def test_two_tables_never_share_an_archive(postgres: Any, database: str, conn: Any) -> None:
    conn.execute("""CREATE SCHEMA a; CREATE SCHEMA b;
        CREATE TABLE task (id int PRIMARY KEY, done timestamptz);
        CREATE TABLE a.note (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE);
        CREATE TABLE b.note (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE)""")
    with pytest.raises(ReconcileError) as caught:
        run(job(postgres, database, archive={"schema": "arch"}, children={"mode": "archive"}))
    assert caught.value.reason == "ArchiveConflict" and '"arch"."note_archive"' in caught.value.message


def test_counts_add_up_over_a_diamond_and_kept_rows_without_a_key_end_the_run(
    postgres: Any, database: str, conn: Any
) -> None:
    conn.execute(f"""CREATE TABLE task (id int PRIMARY KEY, done timestamptz);
        CREATE TABLE c (id int PRIMARY KEY, task int REFERENCES task ON DELETE CASCADE);
        CREATE TABLE g (id int PRIMARY KEY, c int REFERENCES c ON DELETE CASCADE,
                        task int REFERENCES task ON DELETE CASCADE);
        INSERT INTO task SELECT n, {OLD} FROM generate_series(1, 12) n;
        INSERT INTO c SELECT n, n FROM generate_series(1, 12) n;
        INSERT INTO g SELECT n, n, 13 - n FROM generate_series(1, 12) n""")
    before = everything(conn, "task", "c", "g")
    report = run(job(postgres, database, children={"mode": "archive"}))
    assert report.outcome == "Succeeded", report.message
    assert everything(conn, "task", "c", "g") == before
    assert report.tables["public.g archived"] == scalar(conn, "SELECT count(*) FROM g_archive") == 12
    # A table without a primary key and parents to keep: the run ends (kept rows are not taken again).
    conn.execute(f"""CREATE TABLE log (id int UNIQUE, done timestamptz);
        CREATE TABLE hold (id int REFERENCES log (id));
        INSERT INTO log SELECT n, {OLD} FROM generate_series(1, 40) n;
        INSERT INTO hold SELECT generate_series(1, 25)""")
    kept = run(job(postgres, database, table={"name": "log"}, maxRunTime="60s"))
    assert kept.outcome == "Succeeded" and kept.rows_archived == 15, kept
