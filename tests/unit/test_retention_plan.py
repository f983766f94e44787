from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.api.retentionpolicy import RetentionPolicySpec
from pgscale.controllers.retentionpolicy import run_status
from pgscale.errors import SpecError
from pgscale.jobs import from_env
from pgscale.kube import ObjectRef
from pgscale.pg import Column
from pgscale.pg import retention as sqlr
from pgscale.pg.relationships import ForeignKey
from pgscale.pg.retention import RunRow
from pgscale.retention import (
    TableFacts,
    batch_cap,
    batch_pages,
    check_archive,
    effect_of,
    next_batch_size,
    plan,
    plan_relationships,
    row_lock_wait,
)
from pgscale.specs import builders

SPEC = {
    "profileRef": {"name": "app"},
    "table": {"name": "Task"},
    "ageColumn": "completedAt",
    "olderThan": "90d",
    "filters": [
        {"column": "status", "operator": "In", "values": ["COMPLETED", "CANCELLED"]},
        {"column": "userId", "operator": "IsNotNull"},
    ],
}
COLUMNS = {
    n: Column(n, t, False)
    for n, t in [
        ("id", "bigint"),
        ("status", "character varying(20)"),
        ("userId", "bigint"),
        ("completedAt", "timestamp with time zone"),
    ]
}


def test_plan_defaults_archive_name_and_interval() -> None:
    target = plan(RetentionPolicySpec.model_validate(SPEC), COLUMNS, key_columns=["id"], partitioned=False)
    assert (target.archive_schema, target.archive_table) == ("public", "Task_archive")
    assert target.age_interval == "90 days" and target.columns == ("id", "status", "userId", "completedAt")


def test_predicate_binds_values_and_quotes_identifiers() -> None:
    target = plan(RetentionPolicySpec.model_validate(SPEC), COLUMNS, key_columns=["id"], partitioned=False)
    where, params = sqlr.predicate(target)
    text = where.as_string(None)
    assert (
        text == '"s"."completedAt" < %(cutoff)s AND "s"."status" IN (%(f0_0)s, %(f0_1)s) AND "s"."userId" IS NOT NULL'
    )
    assert params == [("f0_0", "COMPLETED"), ("f0_1", "CANCELLED")]


def test_batch_statement_is_one_delete_over_a_page_range() -> None:
    target = plan(RetentionPolicySpec.model_validate(SPEC), COLUMNS, key_columns=["id"], partitioned=False)
    text = sqlr.batch_statement(target, runs=sqlr.runs_table("pgscale")).as_string(None)
    # The DELETE takes the range's matching rows itself (a TID range scan): no lock step, no key order.
    assert text.startswith(
        'WITH moved AS (DELETE FROM ONLY "public"."Task" s WHERE '
        "\"s\".ctid >= ('(' || %(lo)s::bigint || ',0)')::tid AND \"s\".ctid < ('(' || %(hi)s::bigint || ',0)')::tid "
        'AND "s"."completedAt" < %(cutoff)s'
    )
    assert "RETURNING s.*)" in text and "FOR UPDATE" not in text and "ORDER BY" not in text
    assert 'archived AS (INSERT INTO "public"."Task_archive" ("id", "status", "userId", "completedAt") SELECT' in text
    assert 'log AS (UPDATE "pgscale"."retention_runs" SET' in text  # the run log, in the same statement
    assert text.endswith("SELECT (SELECT n FROM mc), NULL")


def test_locked_batch_skips_rows_held_by_others_then_deletes_them_by_ctid() -> None:
    target = plan(RetentionPolicySpec.model_validate(SPEC), COLUMNS, key_columns=["id"], partitioned=False)
    text = sqlr.batch_statement(target, locked=True).as_string(None)
    assert text.startswith('WITH cand AS MATERIALIZED (SELECT s.ctid, "s"."id" FROM ONLY "public"."Task" s WHERE')
    assert "FOR UPDATE OF s SKIP LOCKED)" in text and "ORDER BY" not in text and "LIMIT" not in text
    assert 'DELETE FROM ONLY "public"."Task" t WHERE t.ctid = ANY (ARRAY(SELECT ctid FROM batch)) RETURNING t.*' in text
    inline = sqlr.batch_statement(target, locked=True, inline=True).as_string(None)
    assert "('(' || $2::bigint || ',0)')::tid" in inline and "('(' || $4::bigint || ',0)')::tid" in inline
    assert inline.endswith("SELECT (SELECT n FROM mc)")


def fk(name: str, table: str, action: str, parent: str = "Task", schema: str = "public") -> ForeignKey:
    return ForeignKey(name, schema, table, (f"{parent.lower()}Id",), "public", parent, ("id",), action)


FACTS = {("public", t): TableFacts(("id", "taskId")) for t in ("Message", "File", "Invoice", "Reaction", "Task")}


def test_effects_of_modes_and_actions() -> None:
    assert effect_of(None, "CASCADE") is None and effect_of(None, "SET NULL") is None
    assert effect_of(None, "RESTRICT") == "skipParent" and effect_of(None, "NO ACTION") == "skipParent"
    assert effect_of("archive", "SET NULL") == "archive" and effect_of("archive", "RESTRICT") == "skipParent"
    assert effect_of("archive", "RESTRICT", listed=True) == "archive"
    assert effect_of("delete", "CASCADE") == "delete" and effect_of("delete", "SET NULL") == "setNull"
    assert effect_of("delete", "SET DEFAULT") == "setDefault" and effect_of("delete", "NO ACTION") == "skipParent"
    assert effect_of("keep", "CASCADE") == "skipParent"


def test_unset_children_leaves_destructive_keys_unresolved() -> None:
    spec = RetentionPolicySpec.model_validate(SPEC)
    edges = [fk("m", "Message", "CASCADE"), fk("i", "Invoice", "RESTRICT"), fk("r", "Reaction", "CASCADE", "Message")]
    rels = plan_relationships(spec, edges, FACTS)
    assert [f.name for f in rels.unresolved] == ["m"]
    assert [(i.fk.name, i.effect) for i in rels.listed] == [("m", "unset"), ("i", "skipParent")]


def test_archive_plans_children_recursively_with_their_archives() -> None:
    spec = RetentionPolicySpec.model_validate(
        {
            **SPEC,
            "children": {
                "mode": "archive",
                "tables": [
                    {"name": "Reaction", "mode": "delete"},
                    {"name": "File", "mode": "archive", "archiveTable": "File_old"},
                ],
            },
        }
    )
    edges = [fk("m", "Message", "CASCADE"), fk("f", "File", "SET NULL"), fk("r", "Reaction", "CASCADE", "Message")]
    rels = plan_relationships(spec, edges, FACTS)
    message, file = rels.plans
    assert (message.effect, message.archive_table, file.archive_table) == ("archive", "Message_archive", "File_old")
    assert [(c.fk.name, c.effect) for c in message.children] == [("r", "delete")]
    target = plan(spec, COLUMNS, key_columns=["id"], partitioned=False, children=rels.plans)
    assert target.snapshot_checked
    text = sqlr.batch_statement(target).as_string(None)
    assert (
        'DELETE FROM ONLY "public"."Message" c WHERE "c"."taskId" = ANY (ARRAY(SELECT p."id" FROM "moved" p))' in text
    )
    assert 'INSERT INTO "public"."File_old"' in text and '"public.Reaction deleted"' not in text
    assert "'public.Reaction deleted'" in text


def test_cycles_through_other_tables_are_refused() -> None:
    spec = RetentionPolicySpec.model_validate({**SPEC, "children": {"mode": "archive"}})
    edges = [
        fk("m", "Message", "CASCADE"),
        ForeignKey("t", "public", "Task", ("lastMessageId",), "public", "Message", ("id",), "CASCADE"),
    ]
    with pytest.raises(SpecError) as err:
        plan_relationships(spec, edges, FACTS)
    assert err.value.reason == "ForeignKeyCycle" and "public.Task -> public.Message -> public.Task" in err.value.message


def test_kept_children_become_counted_blockers() -> None:
    spec = RetentionPolicySpec.model_validate({**SPEC, "children": {"mode": "keep"}})
    rels = plan_relationships(spec, [fk("m", "Message", "CASCADE")], FACTS)
    target = plan(spec, COLUMNS, key_columns=["id"], partitioned=False, children=rels.plans)
    text = sqlr.batch_statement(target).as_string(None)
    # The DELETE leaves kept parents out itself (re-checked with the row); the rest of the range's
    # matching rows, those it did not take, are flagged and counted per constraint.
    assert 'AND NOT (EXISTS (SELECT 1 FROM ONLY "public"."Message"' in text
    assert 'RETURNING s.*, s.ctid AS "pgscale ctid")' in text
    assert "kept AS MATERIALIZED (SELECT EXISTS" in text and 'AS "pgscale kept 0"' in text
    assert 'NOT EXISTS (SELECT 1 FROM moved m WHERE m."pgscale ctid" = s.ctid)' in text
    assert "('skipped: m', (SELECT count(*) FROM kept WHERE \"pgscale kept 0\"))" in text
    locked = sqlr.batch_statement(target, locked=True).as_string(None)
    assert "flags AS MATERIALIZED" in locked and "'skipped: m'" in locked
    # pg_cron walks the pages too: kept parents are counted there as well.
    assert "'skipped: m'" in sqlr.batch_statement(target, inline=True).as_string(None)


def test_batches_grow_while_fast_and_shrink_when_slow() -> None:
    def size(current: int, elapsed: float, moved: int = 1) -> int:
        return next_batch_size(current, elapsed, moved=moved, budget=1.0, smallest=10, largest=1000)

    assert size(10, 0.01) == 20  # the aim is 10% of lockTimeout: grow under 5%
    assert size(800, 0.01) == 1000
    assert size(40, 0.07) == 40
    assert size(100, 0.2) == 50
    assert size(20, 1.0) == 10  # never below the pages that hold batchSize rows
    # Pages with no matching row are quick to read, and say nothing of the next ones: at most 8 x batchSize.
    assert size(40, 0.001, moved=0) == 80 and size(80, 0.001, moved=0) == 80 and size(500, 0.001, moved=0) == 80


def test_batch_pages_and_limits_follow_the_lock_budget() -> None:
    assert batch_pages(1000, 50000, 100.0) == (10, 500)
    assert batch_pages(1000, 1000, 0.0) == (1000, 1000)  # no statistics below a row a page
    assert batch_pages(50, 10, 291.0) == (1, 1)
    assert row_lock_wait(1.0) == 0.1 and batch_cap(1.0, 60.0) == 0.5 and batch_cap(1.0, 0.2) == 0.2
    assert batch_cap(0.0, 0.0) == 0.0  # neither set: no limit


def test_without_primary_key_rows_are_named_by_ctid() -> None:
    spec = RetentionPolicySpec.model_validate({**SPEC, "action": "delete"})
    target = plan(spec, COLUMNS, key_columns=[], partitioned=False)
    assert "INSERT" not in sqlr.batch_statement(target).as_string(None)
    text = sqlr.batch_statement(target, locked=True).as_string(None)
    assert "t.ctid = ANY (ARRAY(SELECT ctid FROM batch))" in text and "INSERT" not in text


def test_partitioned_tables_name_rows_by_partition_and_ctid() -> None:
    spec = RetentionPolicySpec.model_validate({**SPEC, "children": {"mode": "keep"}})
    rels = plan_relationships(spec, [fk("m", "Message", "CASCADE")], FACTS)
    target = plan(spec, COLUMNS, key_columns=[], partitioned=True, children=rels.plans)
    text = sqlr.batch_statement(target).as_string(None)
    assert text.startswith('WITH moved AS (DELETE FROM "public"."Task" s WHERE')  # every partition, no ONLY
    assert 'm."pgscale tableoid" = s.tableoid AND m."pgscale ctid" = s.ctid' in text
    assert "pg_partition_tree" in sqlr.extent_query(target).as_string(None)


def test_archive_mismatch_names_columns() -> None:
    spec = RetentionPolicySpec.model_validate(SPEC)
    archive = {**COLUMNS, "status": Column("status", "text", False)}
    del archive["userId"]
    with pytest.raises(SpecError) as err:
        check_archive(spec, COLUMNS, archive)
    assert "'userId' (bigint) is missing" in err.value.message and "'status' is text" in err.value.message


def test_archive_not_created_when_forbidden() -> None:
    spec = RetentionPolicySpec.model_validate({**SPEC, "archive": {"create": False}})
    with pytest.raises(SpecError) as err:
        check_archive(spec, COLUMNS, None)
    assert err.value.field == "archive.create"


def test_job_env_round_trips_without_api_access() -> None:
    owner = ObjectRef("pgscale.io/v1alpha1", "RetentionPolicy", "ns", "rp", "uid")
    profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "db"}, "port": 6432}})
    env = builders.job_env(owner, SPEC, profile)
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["PGSCALE_DB_USER"]["key"] == "username" and refs["PGSCALE_DB_USER_ALT"]["key"] == "user"
    assert all(r["optional"] and r["name"] == "db" for r in refs.values())
    pod_env = {e["name"]: e["value"] for e in env if "value" in e}
    pod_env |= {"PGSCALE_DB_URI": "postgresql://u:p@h:5432/app"}  # what the kubelet would inject
    job = from_env(pod_env)
    assert job is not None and job.policy_key == "ns/rp" and job.spec == SPEC
    assert (job.conn.host, job.conn.port, job.conn.user, job.state_schema) == ("h", 6432, "u", "pgscale")
    assert json.loads(pod_env["PGSCALE_JOB_INPUT"])["spec"]["olderThan"] == "90d"


def test_run_status_of_a_running_run_has_rate_and_eta() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    row: RunRow = {
        "id": 1,
        "started_at": now - timedelta(seconds=10),
        "updated_at": now,
        "ended_at": None,
        "rows_archived": 500,
        "rows_deleted": 0,
        "batches": 5,
        "outcome": "Running",
        "dry_run": False,
        "message": None,
        "rows_matched": None,
        "rows_total": 1000,
        "tables": None,
    }
    status = run_status(row, now)
    assert status.rows_per_second == 50.0 and status.eta_seconds == 10 and status.end_time is None


def test_run_status_shows_the_counts_per_table() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 3, tzinfo=UTC)
    last: RunRow = {
        "id": 2,
        "started_at": now,
        "updated_at": now,
        "ended_at": now,
        "rows_archived": 10,
        "rows_deleted": 0,
        "batches": 1,
        "dry_run": False,
        "outcome": "Succeeded",
        "message": "ok",
        "rows_matched": None,
        "rows_total": 10,
        "tables": {"public.Message archived": 30, "skipped: Invoice_taskId_fkey": 2},
    }
    assert run_status(last, now).tables == {"public.Message archived": 30, "skipped: Invoice_taskId_fkey": 2}
    assert run_status({**last, "tables": None}, now).tables is None
