"""Whole partitions past the cutoff leave as a unit (detach, archive, verify, drop)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from conftest import scalar
from pgscale.jobs import JobInput
from pgscale.jobs.retention import run
from pgscale.pg import retention as sqlr
from pgscale.pg.connection import ConnInfo

pytestmark = pytest.mark.postgres

SPEC: dict[str, Any] = {
    "profileRef": {"name": "app"},
    "table": {"name": "Log"},
    "ageColumn": "createdAt",
    "olderThan": "90d",
    "batchSize": 500,
}


def make_log(conn: psycopg.Connection, *, default: bool) -> None:
    """Monthly partitions covering the last eight months, rows every 30 minutes."""
    conn.execute(
        """CREATE TABLE "Log" (id bigint GENERATED ALWAYS AS IDENTITY, "createdAt" timestamptz NOT NULL,
           msg text, PRIMARY KEY (id, "createdAt")) PARTITION BY RANGE ("createdAt")"""
    )
    conn.execute(
        """DO $$ DECLARE m date := date_trunc('month', now() - interval '8 months');
           BEGIN WHILE m <= now() + interval '1 month' LOOP
             EXECUTE format('CREATE TABLE %I PARTITION OF "Log" FOR VALUES FROM (%L) TO (%L)',
                            'Log_' || to_char(m, 'YYYY_MM'), m, m + interval '1 month');
             m := m + interval '1 month'; END LOOP; END $$"""
    )
    if default:
        conn.execute("""CREATE TABLE "Log_default" PARTITION OF "Log" DEFAULT""")
    conn.execute(
        """INSERT INTO "Log" ("createdAt", msg) SELECT t, 'm' FROM
           generate_series(now() - interval '240 days', now(), interval '30 minutes') t"""
    )


def job(postgres: Any, database: str, **spec: Any) -> JobInput:
    conn = ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )
    return JobInput("ns", "trim-log", {**SPEC, **spec}, "pgscale", conn)


CHECKSUM = "SELECT count(*), md5(string_agg(id::text || (\"createdAt\")::text, ',' ORDER BY id)) FROM {}"


@pytest.mark.parametrize("default", [False, True], ids=["concurrently", "with-default-partition"])
def test_expired_partitions_leave_whole(postgres: Any, database: str, default: bool) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        make_log(conn, default=default)
        original = scalar(conn, CHECKSUM.format('"Log"'))
        old = scalar(conn, """SELECT count(*) FROM "Log" WHERE "createdAt" < now() - interval '90 days'""")
        parts_before = scalar(conn, "SELECT count(*) FROM pg_inherits WHERE inhparent = '\"Log\"'::regclass")
        report = run(job(postgres, database))
        assert report.outcome == "Succeeded", report.message
        assert report.rows_archived == old
        # Whole months before the cutoff went as partitions; the straddling month row by row.
        assert 4 <= len(report.partitions) <= 5
        remaining = scalar(conn, "SELECT count(*) FROM pg_inherits WHERE inhparent = '\"Log\"'::regclass")
        assert remaining == parts_before - len(report.partitions)
        for name in report.partitions:
            assert scalar(conn, f"SELECT to_regclass('\"{name}\"')") is None  # dropped after archiving
        union = """(SELECT * FROM "Log" UNION ALL SELECT * FROM "Log_archive") u"""
        assert scalar(conn, CHECKSUM.format(union)) == original
        assert scalar(conn, """SELECT count(*) FROM "Log" WHERE "createdAt" < now() - interval '90 days'""") == 0


def test_interrupted_partition_archive_is_finished_next_run(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        make_log(conn, default=False)
        original = scalar(conn, CHECKSUM.format('"Log"'))
        first = run(job(postgres, database, olderThan="1y"))  # nothing old enough: creates archive and run log
        assert first.rows_archived == 0
        # A run that died right after detaching the oldest partition:
        part = next(
            p for p in sqlr.partitions(conn, "public", "Log") if scalar(conn, f'SELECT count(*) FROM "{p.name}"')
        )
        target = sqlr.Target(
            "public",
            "Log",
            ("id", "createdAt", "msg"),
            "createdAt",
            "90 days",
            archive_table="Log_archive",
            partitioned=True,
        )
        sqlr.detach(conn, target, part, "ns/trim-log", concurrently=True)
        assert scalar(conn, 'SELECT count(*) FROM "Log"') < original  # the rows are only in the detached table
        report = run(job(postgres, database, olderThan="1y"))
        assert report.partitions == [part.name] and report.rows_archived > 0
        union = """(SELECT * FROM "Log" UNION ALL SELECT * FROM "Log_archive") u"""
        assert scalar(conn, CHECKSUM.format(union)) == original


def test_filters_or_foreign_ownership_mean_row_by_row(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        make_log(conn, default=False)
        report = run(job(postgres, database, filters=[{"column": "msg", "operator": "Equals", "values": ["m"]}]))
        assert report.partitions == [] and report.rows_archived > 0
        owned = job(postgres, database)
        owned = JobInput(
            owned.namespace, owned.name, owned.spec, owned.state_schema, owned.conn, {"partitionsOwnedElsewhere": True}
        )
        conn.execute("""INSERT INTO "Log" ("createdAt", msg) VALUES (now() - interval '200 days', 'late')""")
        again = run(owned)
        assert again.partitions == [] and again.rows_archived == 1


def test_marked_but_still_attached_partition_is_retired_normally(postgres: Any, database: str) -> None:
    """A run that died between marking a partition and detaching it."""
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        make_log(conn, default=False)
        original = scalar(conn, CHECKSUM.format('"Log"'))
        part = next(
            p for p in sqlr.partitions(conn, "public", "Log") if scalar(conn, f'SELECT count(*) FROM "{p.name}"')
        )
        conn.execute(f"""COMMENT ON TABLE "{part.name}" IS 'pgscale-retention:ns/trim-log'""")
        assert sqlr.detached_leftovers(conn, "ns/trim-log") == []  # attached: not a leftover
        report = run(job(postgres, database))
        assert part.name in report.partitions
        union = """(SELECT * FROM "Log" UNION ALL SELECT * FROM "Log_archive") u"""
        assert scalar(conn, CHECKSUM.format(union)) == original
