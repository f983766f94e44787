from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pgscale import builders
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.api.retentionpolicy import RetentionPolicySpec
from pgscale.controllers.retentionpolicy import run_status
from pgscale.errors import SpecError
from pgscale.jobs import from_env
from pgscale.kube import ObjectRef
from pgscale.pg import Column
from pgscale.pg import retention as sqlr
from pgscale.retention import check_archive, plan

SPEC = {
    "profileRef": {"name": "app"}, "table": {"name": "Task"}, "ageColumn": "completedAt", "olderThan": "90d",
    "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED", "CANCELLED"]},
                {"column": "userId", "operator": "IsNotNull"}],
}  # fmt: skip
COLUMNS = {
    n: Column(n, t, False)
    for n, t in [("id", "bigint"), ("status", "character varying(20)"), ("userId", "bigint"),
                 ("completedAt", "timestamp with time zone")]
}  # fmt: skip


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


def test_batch_statement_is_one_atomic_statement_by_key() -> None:
    target = plan(RetentionPolicySpec.model_validate(SPEC), COLUMNS, key_columns=["id"], partitioned=False)
    text = sqlr.batch_statement(target, after=True).as_string(None)
    assert text.count("WITH batch AS MATERIALIZED") == 1
    assert "FOR UPDATE OF s SKIP LOCKED" in text and 'ORDER BY s."id"' in text and '(s."id") > (%(after_0)s)' in text
    assert 'DELETE FROM "public"."Task" t WHERE (t."id") IN (SELECT "id" FROM batch) RETURNING t.*' in text
    assert 'INSERT INTO "public"."Task_archive"' in text


def test_without_primary_key_rows_are_named_by_ctid() -> None:
    spec = RetentionPolicySpec.model_validate({**SPEC, "action": "delete"})
    text = sqlr.batch_statement(plan(spec, COLUMNS, key_columns=[], partitioned=False)).as_string(None)
    assert "t.ctid = ANY (ARRAY(SELECT ctid FROM batch))" in text and "INSERT" not in text


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
    row = {"started_at": now - timedelta(seconds=10), "ended_at": None, "rows_archived": 500, "rows_deleted": 0,
           "batches": 5, "outcome": "Running", "dry_run": False, "message": None, "rows_matched": None,
           "rows_total": 1000}  # fmt: skip
    status = run_status(row, now)
    assert status["rowsPerSecond"] == 50.0 and status["etaSeconds"] == 10 and status["endTime"] is None
