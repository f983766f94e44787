"""RetentionPolicy batches over heap page ranges, against a real PostgreSQL: the interleavings the
one-statement DELETE has to get right, made certain instead of left to chance.

- A row another transaction changes while a batch waits for it is judged in its new version:
  under READ COMMITTED it is re-checked (and archived as it now is, or left if it no longer
  matches), under REPEATABLE READ the batch is retried.
- A HOT update moves a row to another slot of its page during the batch: the new version is
  the one archived.
- A row another transaction holds is waited for only briefly; the range then runs again with
  SKIP LOCKED and the row is left for the next run (job and pg_cron alike).
- Rows on the first and last slots of pages where ranges meet move exactly once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from conftest import scalar, seed_tasks
from pgscale.api.retentionpolicy import RetentionPolicySpec
from pgscale.jobs import JobInput
from pgscale.jobs.retention import run
from pgscale.pg import retention as sqlr
from pgscale.pg.connection import ConnInfo
from pgscale.retention import prepare

pytestmark = pytest.mark.postgres

EV = """
CREATE TABLE ev (id int PRIMARY KEY, state text NOT NULL, done timestamptz, note text) WITH (fillfactor = 60);
INSERT INTO ev SELECT g, CASE WHEN g % 5 = 0 THEN 'open' ELSE 'done' END,
                      now() - interval '200 days' + (g || ' min')::interval, 'row ' || g
  FROM generate_series(1, 600) g;
ALTER TABLE ev ALTER COLUMN note SET STORAGE PLAIN;  -- a long note stays in the row: it cannot fit its page
ANALYZE ev;
"""
EV_SPEC: dict[str, Any] = {
    "profileRef": {"name": "app"},
    "table": {"name": "ev"},
    "ageColumn": "done",
    "olderThan": "90d",
    "filters": [{"column": "state", "operator": "Equals", "values": ["done"]}],
    "batchSize": 50,
    "maxBatchSize": 50,
}
EV_MATCH = "state = 'done' AND done < now() - interval '90 days'"


def job(postgres: Any, database: str, spec: dict[str, Any]) -> JobInput:
    info = ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )
    return JobInput("ns", "batches", spec, "pgscale", info)


def rows(conn: psycopg.Connection, table: str) -> dict[int, tuple[Any, ...]]:
    if scalar(conn, "SELECT to_regclass(%s)", (f'"{table}"',)) is None:
        return {}
    return {r[0]: r for r in conn.execute(f'SELECT * FROM "{table}"').fetchall()}


def wait_until_blocked(conn: psycopg.Connection, pid: int, timeout: float = 20.0) -> None:
    """Until the backend ``pid`` waits for a lock (a row another transaction holds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scalar(conn, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)) == "Lock":
            return
        time.sleep(0.005)
    raise AssertionError(f"backend {pid} never waited for a lock")


def block_of(ctid: str) -> int:
    return int(ctid.strip("()").split(",")[0])


@pytest.fixture
def conn(postgres: Any, database: str) -> Any:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        yield c


CHANGES = {
    # (the writer's change to a matching row, whether the row still matches after it)
    "still-matches-hot": ("UPDATE ev SET note = note || ' edited' WHERE id = %s RETURNING ctid::text", True),
    "stopped-matching": ("UPDATE ev SET state = 'open', note = 'reopened' WHERE id = %s RETURNING ctid::text", False),
    "became-young": ("UPDATE ev SET done = now(), note = 'young' WHERE id = %s RETURNING ctid::text", False),
    "moved-to-another-page": ("UPDATE ev SET note = repeat('x', 4000) WHERE id = %s RETURNING ctid::text", True),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_row_changed_while_the_batch_waits_for_it_is_judged_in_its_new_version(
    postgres: Any, database: str, conn: Any, change: str
) -> None:
    """READ COMMITTED (no references): the DELETE waits for the writer's row, then re-checks the predicate
    on the version the writer committed (EvalPlanQual) and archives exactly that version, or leaves it."""
    conn.execute(EV)
    before = rows(conn, "ev")
    matching = {r[0] for r in conn.execute(f"SELECT id FROM ev WHERE {EV_MATCH}").fetchall()}
    target = prepare(conn, RetentionPolicySpec.model_validate(EV_SPEC), "pgscale").target
    assert not target.snapshot_checked
    end, _ = sqlr.heap_extent(conn, target)
    row_id = 123
    statement, still_matches = CHANGES[change]
    cutoff = sqlr.cutoff_for(conn, target.age_interval)
    with (
        psycopg.connect(postgres.dsn(database)) as writer,
        psycopg.connect(postgres.dsn(database), autocommit=True) as batcher,
    ):
        old_ctid = scalar(writer, "SELECT ctid::text FROM ev WHERE id = %s", (row_id,))
        new_ctid = scalar(writer, statement, (row_id,))  # holds the row until commit
        pid = scalar(batcher, "SELECT pg_backend_pid()")
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(batch=sqlr.move_batch(batcher, target, cutoff, 0, end)))
        thread.start()
        wait_until_blocked(conn, pid)
        writer.commit()
        thread.join(30)
        assert not thread.is_alive()
    if change == "still-matches-hot":
        assert block_of(new_ctid) == block_of(old_ctid) and new_ctid != old_ctid  # a HOT update: same page
    if change == "moved-to-another-page":
        assert block_of(new_ctid) != block_of(old_ctid)
    after, archive = rows(conn, "ev"), rows(conn, "ev_archive")
    changed = scalar(
        conn, "SELECT note FROM ev WHERE id = %s UNION ALL SELECT note FROM ev_archive WHERE id = %s", (row_id, row_id)
    )
    assert changed != before[row_id][3]  # wherever it is, the row is in the version the writer committed
    assert not set(after) & set(archive) and set(after) | set(archive) == set(before)
    assert (row_id in archive) == still_matches or change == "moved-to-another-page"
    assert set(archive) - {row_id} == matching - {row_id}  # every other matching row went, nothing else
    assert result["batch"].moved == len(archive)
    print(f"\n{change}: row {row_id} {old_ctid} -> {new_ctid}, archived: {row_id in archive}")
    assert all(before[i] == r for i, r in {**after, **archive}.items() if i != row_id)  # unchanged


def test_a_repeatable_read_batch_retries_when_a_row_changed_under_it(postgres: Any, database: str, conn: Any) -> None:
    """REPEATABLE READ (children archived): the batch that waited for a writer's row fails once the writer
    commits, and is retried whole with a new snapshot; the row goes in its new version."""
    seed_tasks(conn, 1000)
    before = rows(conn, "Task")
    row_id = scalar(conn, """SELECT min(id) FROM "Task" WHERE status = 'COMPLETED' AND id > 500""")
    spec = {
        **EV_SPEC,
        "table": {"name": "Task"},
        "ageColumn": "completedAt",
        "children": {"mode": "archive"},
        "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
        "batchSize": 2000,
        "maxBatchSize": 2000,
        "lockTimeout": "60s",
    }
    with psycopg.connect(postgres.dsn(database)) as writer:
        writer.execute("""UPDATE "Task" SET title = 'edited' WHERE id = %s""", (row_id,))
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(report=run(job(postgres, database, spec))))
        thread.start()
        deadline = time.monotonic() + 20
        while (
            not scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                "application_name LIKE 'pgscale-retention%%'",
            )
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        writer.commit()
        thread.join(60)
    report = result["report"]
    assert report.outcome == "Succeeded" and report.retries >= 1, report
    archive = rows(conn, "Task_archive")
    assert archive[row_id][1] == "edited"  # the version the writer committed
    after = rows(conn, "Task")
    assert not set(after) & set(archive) and set(after) | set(archive) == set(before)


def test_a_row_held_by_another_transaction_is_passed_over_not_waited_for(
    postgres: Any, database: str, conn: Any
) -> None:
    """A row locked for the whole run: the batch waits a tenth of lockTimeout, runs its range again with
    SKIP LOCKED, and the run ends without it; the next run takes it."""
    conn.execute(EV)
    matching = {r[0] for r in conn.execute(f"SELECT id FROM ev WHERE {EV_MATCH}").fetchall()}
    spec = {**EV_SPEC, "lockTimeout": "1s", "batchSize": 1000, "maxBatchSize": 1000}
    with psycopg.connect(postgres.dsn(database)) as holder:
        holder.execute("SELECT 1 FROM ev WHERE id = 123 FOR UPDATE")
        started = time.monotonic()
        report = run(job(postgres, database, spec))
        took = time.monotonic() - started
        assert report.outcome == "Succeeded" and report.retries >= 1, report
        assert set(rows(conn, "ev_archive")) == matching - {123}
        assert took < 5, took  # waited about 0.1 s for the row, never the whole lockTimeout per batch
    again = run(job(postgres, database, spec))
    assert again.outcome == "Succeeded" and again.rows_archived == 1
    assert set(rows(conn, "ev_archive")) == matching


def test_pg_cron_passes_over_a_held_row_too(postgres: Any, database: str, conn: Any) -> None:
    conn.execute(EV)
    matching = {r[0] for r in conn.execute(f"SELECT id FROM ev WHERE {EV_MATCH}").fetchall()}
    run(job(postgres, database, {**EV_SPEC, "dryRun": True}))  # creates the archive and the run log
    target = prepare(conn, RetentionPolicySpec.model_validate(EV_SPEC), "pgscale").target
    sqlr.ensure_procedure(conn, "pgscale")
    sqlr.save_config(
        conn,
        "pgscale",
        "ns/cron",
        target,
        dry_run=False,
        lock_timeout="1s",
        row_lock_wait="100ms",
        statement_timeout="60s",
        max_run="1 hour",
        pause=0.0,
    )
    with psycopg.connect(postgres.dsn(database)) as holder:
        holder.execute("SELECT 1 FROM ev WHERE id = 123 FOR UPDATE")
        conn.execute("CALL pgscale.retention_run('ns/cron')")
    outcome, archived = conn.execute(
        "SELECT outcome, rows_archived FROM pgscale.retention_runs WHERE policy = 'ns/cron'"
    ).fetchone()
    assert outcome == "Succeeded" and archived == len(matching) - 1
    assert set(rows(conn, "ev_archive")) == matching - {123}
    conn.execute("CALL pgscale.retention_run('ns/cron')")
    assert set(rows(conn, "ev_archive")) == matching


def test_rows_on_the_edges_of_page_ranges_move_exactly_once(postgres: Any, database: str, conn: Any) -> None:
    """Ranges [lo, hi) of pages: a range takes every slot of its pages, the first and the last, and
    nothing of the next page."""
    conn.execute(EV)
    target = prepare(conn, RetentionPolicySpec.model_validate(EV_SPEC), "pgscale").target
    end, _ = sqlr.heap_extent(conn, target)
    assert end > 4
    cutoff = sqlr.cutoff_for(conn, target.age_interval)
    layout = {r[0]: block_of(r[1]) for r in conn.execute(f"SELECT id, ctid::text FROM ev WHERE {EV_MATCH}")}
    edges = conn.execute("SELECT min(ctid)::text, max(ctid)::text FROM ev WHERE ctid < '(2,0)'").fetchone()
    moved: set[int] = set()
    for lo, hi in [(0, 1), (1, 3), (3, end)]:
        batch = sqlr.move_batch(conn, target, cutoff, lo, hi)
        now = set(rows(conn, "ev_archive"))
        assert now - moved == {i for i, b in layout.items() if lo <= b < hi}
        assert batch.moved == len(now - moved)
        moved = now
    assert moved == set(layout)
    assert edges[0].endswith(",1)") and block_of(edges[1]) == 1  # the first slot of page 0, the last of page 1


def test_a_batch_that_cannot_get_smaller_may_take_the_whole_statement_timeout(
    postgres: Any, database: str, conn: Any
) -> None:
    """A batch above its smallest size that holds its rows longer than half of lockTimeout is rolled back
    and halved; one at the smallest size runs again with the whole statementTimeout, and the run ends."""
    conn.execute(EV)
    matching = {r[0] for r in conn.execute(f"SELECT id FROM ev WHERE {EV_MATCH}").fetchall()}
    run(job(postgres, database, {**EV_SPEC, "dryRun": True}))  # creates the archive
    conn.execute("""CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                    $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
                    CREATE TRIGGER slow AFTER INSERT ON ev_archive FOR EACH STATEMENT EXECUTE FUNCTION slow()""")
    report = run(job(postgres, database, {**EV_SPEC, "lockTimeout": "400ms", "batchSize": 300, "maxBatchSize": 300}))
    assert report.outcome == "Succeeded" and report.retries >= report.batches, report
    assert set(rows(conn, "ev_archive")) == matching


def test_kept_parents_of_a_partitioned_table_are_counted_and_stay(postgres: Any, database: str, conn: Any) -> None:
    """A range of pages covers every partition; parents a RESTRICT key holds are left out by the DELETE
    and counted, named by (partition, ctid)."""
    conn.execute("""CREATE TABLE pt (id int, done timestamptz NOT NULL, PRIMARY KEY (id, done))
          PARTITION BY RANGE (done);
        CREATE TABLE pt_a PARTITION OF pt FOR VALUES FROM ('2000-01-01') TO ('2025-01-01');
        CREATE TABLE pt_b PARTITION OF pt FOR VALUES FROM ('2025-01-01') TO (MAXVALUE);
        INSERT INTO pt SELECT g, now() - interval '100 days' - (g * 3 || ' days')::interval
          FROM generate_series(1, 600) g;
        INSERT INTO pt SELECT g, now() FROM generate_series(601, 700) g;
        CREATE TABLE inv (id int PRIMARY KEY, pt int, at timestamptz, FOREIGN KEY (pt, at) REFERENCES pt (id, done));
        INSERT INTO inv SELECT id, id, done FROM pt WHERE id % 7 = 0""")
    before = {r for r in conn.execute("SELECT id, done FROM pt").fetchall()}
    spec = {
        "profileRef": {"name": "app"},
        "table": {"name": "pt"},
        "ageColumn": "done",
        "olderThan": "90d",
        "partitionAware": False,
        "batchSize": 20,
        "maxBatchSize": 20,
    }
    report = run(job(postgres, database, spec))
    assert report.outcome == "Succeeded", report.message
    kept = {r for r in conn.execute("SELECT id, done FROM pt").fetchall()}
    archived = {r for r in conn.execute("SELECT id, done FROM pt_archive").fetchall()}
    assert not kept & archived and kept | archived == before
    assert {i for i, _ in archived} == {i for i in range(1, 601) if i % 7}
    assert report.tables == {"skipped: inv_pt_at_fkey": len([i for i in range(1, 601) if i % 7 == 0])}
    assert report.batches > 1
