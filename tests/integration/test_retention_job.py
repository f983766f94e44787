"""RetentionPolicy runs against a real PostgreSQL: exact, concurrent-safe, crash-safe.

The job is run both in-process (run()) and, for the kill test, exactly as its pod
runs it: `pgscale job retention` with the environment the operator renders.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import psycopg
import pytest

from conftest import kill_after_batches, run_container, scalar, seed_tasks, start_container, wait_until
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.jobs import JobInput
from pgscale.jobs.retention import run
from pgscale.kube import ObjectRef
from pgscale.pg.connection import ConnInfo
from pgscale.specs import builders

pytestmark = pytest.mark.postgres

PREDICATE = """status = 'COMPLETED' AND "completedAt" < now() - interval '90 days'"""
SPEC: dict[str, Any] = {
    "profileRef": {"name": "app"},
    "table": {"name": "Task"},
    "ageColumn": "completedAt",
    "olderThan": "90d",
    "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
    "batchSize": 250,
    "maxBatchSize": 250,
    "children": {"mode": "archive"},
}


def rows(conn: psycopg.Connection, table: str) -> dict[int, tuple[Any, ...]]:
    return {r[0]: r for r in conn.execute(f'SELECT * FROM "{table}" ORDER BY id').fetchall()}


def job_for(postgres: Any, database: str, **spec: Any) -> JobInput:
    conn = ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )
    return JobInput("ns", "archive-tasks", {**SPEC, **spec}, "pgscale", conn)


@pytest.fixture
def conn(postgres: Any, database: str) -> Any:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as c:
        yield c


def test_moves_exactly_the_matching_rows(postgres: Any, database: str, conn: psycopg.Connection) -> None:
    seed_tasks(conn, 5000)
    before = rows(conn, "Task")
    expected = {r[0] for r in conn.execute(f'SELECT id FROM "Task" WHERE {PREDICATE}').fetchall()}
    assert 1000 < len(expected) < 5000
    report = run(job_for(postgres, database))
    assert report.outcome == "Succeeded" and report.rows_archived == len(expected)
    # Fixed batches (batchSize = maxBatchSize): page ranges that hold about 250 rows, walked once.
    pages = scalar(conn, """SELECT pg_relation_size('"Task"') / 8192""")
    assert len(expected) / 250 <= report.batches <= pages
    after, archive = rows(conn, "Task"), rows(conn, "Task_archive")
    assert set(archive) == expected and not (set(after) & set(archive))
    assert after | archive == before  # every row, unchanged, in exactly one place
    again = run(job_for(postgres, database))
    assert again.outcome == "Succeeded" and again.rows_archived == 0
    log = conn.execute("SELECT outcome, rows_archived, batches FROM pgscale.retention_runs ORDER BY id").fetchall()
    assert log == [("Succeeded", len(expected), report.batches), ("Succeeded", 0, again.batches)]


def test_dry_run_counts_and_moves_nothing(postgres: Any, database: str, conn: psycopg.Connection) -> None:
    seed_tasks(conn, 2000)
    expected = scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}')
    report = run(job_for(postgres, database, dryRun=True))
    assert report.outcome == "DryRun" and report.rows_matched == expected and report.rows_archived == 0
    assert scalar(conn, 'SELECT count(*) FROM "Task"') == 2000


def test_delete_action_without_archive(postgres: Any, database: str, conn: psycopg.Connection) -> None:
    seed_tasks(conn, 1000)
    expected = scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}')
    report = run(job_for(postgres, database, action="delete"))
    assert report.rows_deleted == expected and report.rows_archived == 0
    assert scalar(conn, "SELECT to_regclass('\"Task_archive\"')") is None


class Writer(threading.Thread):
    """The application: flips tasks into and out of COMPLETED, edits and inserts, and
    remembers the last committed version of every row it changed."""

    def __init__(self, dsn: str, ids: list[int]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.ids = dsn, ids
        self.stop = threading.Event()
        self.last: dict[int, tuple[Any, ...]] = {}
        self.ops = 0
        self.rng = random.Random(7)

    def run(self) -> None:
        statements = [
            # into COMPLETED, long ago: now matches the policy
            """UPDATE "Task" SET status = 'COMPLETED', "completedAt" = now() - interval '200 days',
               title = title || '+c' WHERE id = %s RETURNING *""",
            # out of COMPLETED: must not be archived any more
            """UPDATE "Task" SET status = 'PENDING', "completedAt" = NULL, title = title || '+p'
               WHERE id = %s RETURNING *""",
            """UPDATE "Task" SET title = title || '+e' WHERE id = %s RETURNING *""",
        ]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while not self.stop.is_set() and time.monotonic() < deadline:
                op = self.rng.randrange(4)
                if op == 3:
                    row = conn.execute(
                        """INSERT INTO "Task" (title, status, "createdAt", "completedAt") VALUES
                           ('new', 'COMPLETED', now() - interval '300 days', now() - interval '299 days')
                           RETURNING *"""
                    ).fetchone()
                else:
                    row = conn.execute(statements[op], (self.rng.choice(self.ids),)).fetchone()
                if row is not None:  # None: the row was archived before this update
                    self.last[row[0]] = row
                self.ops += 1


def widen_window(conn: psycopg.Connection, table: str, seconds: float) -> None:
    """Sleep at the end of every INSERT into the archive: the gap between two statements
    of the strategy's function, or a slow batch of pgscale's, becomes wide and certain."""
    conn.execute(f"""CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                     $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$""")
    conn.execute(f'CREATE TRIGGER slow AFTER INSERT ON "{table}" FOR EACH STATEMENT EXECUTE FUNCTION slow()')


def check_nothing_lost(
    before: dict[int, tuple[Any, ...]],
    writer: Writer,
    after: dict[int, tuple[Any, ...]],
    archive: dict[int, tuple[Any, ...]],
) -> tuple[set[int], set[int], set[int]]:
    """(lost, duplicated, stale) row ids."""
    expected = {**before, **writer.last}
    lost = set(expected) - set(after) - set(archive)
    duplicated = set(after) & set(archive)
    stale = {i for i, r in {**after, **archive}.items() if r != expected.get(i, r)}
    return lost, duplicated, stale


@pytest.mark.parametrize("children", ["archive", "delete"])
def test_concurrent_writer_loses_nothing(postgres: Any, database: str, conn: psycopg.Connection, children: str) -> None:
    """With children archived, batches run in REPEATABLE READ (a row changed under a batch fails it, and it is
    retried); with delete, in READ COMMITTED (the DELETE re-checks a changed row in its new version)."""
    seed_tasks(conn, 6000)
    conn.execute('CREATE TABLE "Task_archive" (LIKE "Task" INCLUDING DEFAULTS)')
    conn.execute('ALTER TABLE "Task_archive" ADD PRIMARY KEY (id)')
    widen_window(conn, "Task_archive", 0.05)
    before = rows(conn, "Task")
    writer = Writer(postgres.dsn(database), list(before))
    writer.start()
    time.sleep(0.2)
    report = run(job_for(postgres, database, batchSize=100, children={"mode": children}))
    writer.stop.set()
    writer.join()
    after, archive = rows(conn, "Task"), rows(conn, "Task_archive")
    lost, duplicated, stale = check_nothing_lost(before, writer, after, archive)
    assert report.outcome == "Succeeded" and writer.ops > 100
    assert (lost, duplicated, stale) == (set(), set(), set())
    # Every archived row matched the policy in the version that was archived.
    assert all(r[2] == "COMPLETED" for r in archive.values())
    print(
        f"\npgscale: {report.rows_archived} archived in {report.batches} batches while the writer made "
        f"{writer.ops} changes; lost 0, duplicated 0, stale 0"
    )


STRATEGY_FUNCTION = """
CREATE OR REPLACE FUNCTION archive_old_tasks()
RETURNS void AS $$
BEGIN
  -- Move to archive table
  INSERT INTO task_archive
  SELECT * FROM "Task"
  WHERE status = 'COMPLETED'
  AND {column} < NOW() - INTERVAL '90 days';

  -- Delete from main table
  DELETE FROM "Task"
  WHERE status = 'COMPLETED'
  AND {column} < NOW() - INTERVAL '90 days';
END;
$$ LANGUAGE plpgsql;
"""


def test_strategy_function_loses_rows_under_the_same_writer(
    postgres: Any, database: str, conn: psycopg.Connection
) -> None:
    """The strategy's archive_old_tasks(), verbatim: with its unquoted completedAt it does not
    even run on a camelCase column; quoted, a concurrent writer makes it lose rows."""
    seed_tasks(conn, 6000)
    conn.execute('CREATE TABLE task_archive (LIKE "Task" INCLUDING DEFAULTS)')
    conn.execute(STRATEGY_FUNCTION.format(column="completedAt"))
    with pytest.raises(psycopg.errors.UndefinedColumn, match='column "completedat" does not exist'):
        conn.execute("SELECT archive_old_tasks()")
    conn.execute(STRATEGY_FUNCTION.format(column='"completedAt"'))
    widen_window(conn, "task_archive", 1.0)
    before = rows(conn, "Task")
    writer = Writer(postgres.dsn(database), list(before))
    writer.start()
    time.sleep(0.2)
    conn.execute("SELECT archive_old_tasks()")
    writer.stop.set()
    writer.join()
    after, archive = rows(conn, "Task"), rows(conn, "task_archive")
    lost, duplicated, stale = check_nothing_lost(before, writer, after, archive)
    print(
        f"\nstrategy function: lost {len(lost)}, duplicated {len(duplicated)}, stale {len(stale)} "
        f"while the writer made {writer.ops} changes"
    )
    assert lost, "the strategy's two-statement function lost no row this time"


def test_killed_job_resumes_without_loss_or_duplicates(postgres: Any, database: str, conn: psycopg.Connection) -> None:
    """SIGKILL `pgscale job retention` (as its pod runs it) three times mid-run, then let it finish."""
    seed_tasks(conn, 6000)
    before = rows(conn, "Task")
    expected = {r[0] for r in conn.execute(f'SELECT id FROM "Task" WHERE {PREDICATE}').fetchall()}
    owner = ObjectRef("pgscale.io/v1alpha1", "RetentionPolicy", "ns", "archive-tasks", "uid")
    profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}})
    # 20 ms between batches: a run lasts about a second, so the poller sees it mid-run even when a
    # busy machine starves it for a few hundred milliseconds (a whole run was missed once).
    spec = {**SPEC, "batchSize": 100, "maxBatchSize": 100, "pauseBetweenBatches": "20ms"}
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
    last_id = 0
    for _ in range(3):
        proc = start_container(pod, secrets)
        last_id = kill_after_batches(proc, conn, last_id, random.randint(2, 6))
    final = run_container(pod, secrets)
    assert final.returncode == 0, final.stderr
    report = json.loads(final.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "Succeeded"
    after, archive = rows(conn, "Task"), rows(conn, "Task_archive")
    assert set(archive) == expected and after | archive == before and not (set(after) & set(archive))
    log = conn.execute("SELECT outcome, message FROM pgscale.retention_runs ORDER BY id").fetchall()
    assert [o for o, _ in log] == ["Failed"] * 3 + ["Succeeded"]
    assert all("interrupted" in m for _, m in log[:3])
    assert sum(r[0] for r in conn.execute("SELECT rows_archived FROM pgscale.retention_runs").fetchall()) == len(
        expected
    )


def test_one_run_at_a_time_and_dead_runs_are_recognised(postgres: Any, database: str, conn: psycopg.Connection) -> None:
    from pgscale.pg import retention as sqlr

    seed_tasks(conn, 300)
    first = run(job_for(postgres, database))  # creates the run log
    assert first.outcome == "Succeeded"
    with psycopg.connect(postgres.dsn(database), autocommit=True) as other:
        assert sqlr.try_run_lock(other, "ns/archive-tasks")  # a run in progress elsewhere
        skipped = run(job_for(postgres, database))
        assert skipped.outcome == "Skipped" and skipped.run_id is None
        other.execute("INSERT INTO pgscale.retention_runs (policy) VALUES ('ns/archive-tasks')")
        assert sqlr.mark_interrupted(conn, "pgscale", "ns/archive-tasks") == 0  # its lock is held: alive
    # The session is gone (killed): its Running row is recognised as interrupted, once its backend has
    # exited and so released the lock (after the client's close returns: seen on a busy machine).
    wait_until(lambda: not sqlr.run_lock_held(conn, "ns/archive-tasks"), timeout=30, what="the lock released")
    assert sqlr.mark_interrupted(conn, "pgscale", "ns/archive-tasks") == 1
    last = conn.execute("SELECT outcome, message FROM pgscale.retention_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert last is not None and last[0] == "Failed" and last[1].startswith("interrupted")
