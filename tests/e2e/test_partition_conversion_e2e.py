"""Acceptance: a PartitionPolicy converts the live "Task" table through the operator while
the application writes, and explains itself (Stalled, table untouched) when it cannot."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from conftest import ROOT, Kubectl, load_example, run_container, scalar, seed_tasks
from writers import Writer, assert_nothing_lost, rows

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def test_live_task_table_converts_under_a_writer(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 40000)
        before = rows(conn)
        writer = Writer(postgres.dsn(database), list(before))
        writer.start()
        try:
            kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
            policy = load_example("partitionpolicy.yaml")[0]
            policy["spec"]["conversion"].update(batchSize=500, pauseBetweenBatches="50ms")
            del policy["spec"]["retention"]  # every row stays attached: the comparison is exact
            kubectl.apply(policy)
            # Progress shows while it runs: counts, rate, ETA, and Reconciling (not Ready).
            deadline = time.monotonic() + 90
            seen: dict[str, Any] = {}
            while time.monotonic() < deadline:
                obj = kubectl.get("partitionpolicy", "task-by-month")
                conv = obj.get("status", {}).get("conversion") or {}
                if conv.get("step") == "prepared" and conv.get("rowsDone"):
                    seen = obj
                    break
                time.sleep(0.3)
            assert seen, "no conversion progress was reported"
            conv = seen["status"]["conversion"]
            assert conv["rowsTotal"] >= 39000 and conv["rowsPerSecond"] > 0 and conv["etaSeconds"] is not None
            reconciling = condition(seen, "Reconciling")
            assert reconciling is not None and reconciling["reason"] == "Converting"
            kubectl.wait("partitionpolicy", "task-by-month", "Ready", timeout=180)
            time.sleep(0.5)
        finally:
            writer.stop.set()
            writer.join(10)
        assert_nothing_lost(conn, before, writer)
        # Future partitions exist, and a month's range prunes to one partition.
        now = datetime.now(UTC)
        names = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON "
                "c.oid = i.inhrelid WHERE i.inhparent = '\"Task\"'::regclass"
            )
        }
        ahead = [
            f"Task_{(now.year * 12 + now.month - 1 + k) // 12}_{(now.month - 1 + k) % 12 + 1:02d}" for k in range(5)
        ]
        assert set(ahead) <= names
        plan = [
            r[0]
            for r in conn.execute(
                """EXPLAIN SELECT * FROM "Task" WHERE "createdAt" >= '2026-01-01T00:00:00Z'
               AND "createdAt" < '2026-02-01T00:00:00Z'"""
            ).fetchall()
        ]
        scans = [line for line in plan if "Scan" in line and " on " in line]
        # One partition: every scan (a bitmap heap scan and its index scan, say) is on Task_2026_01.
        assert scans and all("Task_2026_01" in line for line in scans), plan
    obj = kubectl.get("partitionpolicy", "task-by-month")
    status = obj["status"]
    assert status["partitioned"] is True and status["conversion"]["step"] == "done"
    assert status["conversion"]["longestLockMs"] < 1000
    assert not obj["metadata"].get("finalizers")
    reasons = {e["reason"] for e in json.loads(kubectl.run("get", "events", "-o", "json"))["items"]}
    assert {"ConversionStarted", "ConversionVerified", "ConversionSwitched", "OldTableDropped"} <= reasons


def test_blocked_conversion_stalls_and_leaves_the_table(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 100)
        before = rows(conn)
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        policy = load_example("partitionpolicy.yaml")[0]
        policy["spec"]["conversion"] = {"widenKeys": False}
        del policy["spec"]["retention"]
        kubectl.apply(policy)
        kubectl.wait("partitionpolicy", "task-by-month", "Stalled")
        stalled = condition(kubectl.get("partitionpolicy", "task-by-month"), "Stalled")
        assert stalled is not None and stalled["reason"] == "ConversionBlocked"
        assert "primary key 'Task_pkey' (id) lacks the partition column 'createdAt'" in stalled["message"]
        assert "Message_taskId_fkey" in stalled["message"] and "spec.conversion" in stalled["message"]
        assert rows(conn) == before
        assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "r"
        assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgscale%'") == 0
        # Choosing what the message offers converts it.
        policy["spec"]["conversion"] = {"widenKeys": True, "dropReferencingForeignKeys": True}
        kubectl.apply(policy)
        kubectl.wait("partitionpolicy", "task-by-month", "Ready", timeout=120)
        assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "p"
        assert rows(conn) == before


def test_maintenance_cronjob_runs_the_same_work(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    """maintenance.cronJob: the CronJob's pod command (run here as the kubelet would) converts and maintains."""
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 3000)
        before = rows(conn)
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        policy = load_example("partitionpolicy.yaml")[0]
        del policy["spec"]["retention"]
        policy["spec"]["suspend"] = True  # the operator only reports: the CronJob's run does the work
        policy["spec"]["maintenance"] = {"cronJob": True, "schedule": "*/30 * * * *", "interval": "1h"}
        kubectl.apply(policy)
        kubectl.wait("partitionpolicy", "task-by-month", "Ready")
        cron = kubectl.get("cronjob", "task-by-month-partition-maintenance")
        assert cron["spec"]["schedule"] == "*/30 * * * *" and cron["spec"]["suspend"] is True
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["args"][:2] == ["job", "partition-maintenance"]
        secret = {k: base64.b64decode(v).decode() for k, v in kubectl.get("secret", "app-db")["data"].items()}
        result = run_container(pod, {"app-db": secret})
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["outcome"] == "Succeeded" and report["conversion"]["phase"] == "done"
        assert report["partitions"] >= 25 and scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "p"
        assert rows(conn) == before
        # Turning the CronJob off removes it.
        policy["spec"]["maintenance"]["cronJob"] = False
        kubectl.apply(policy)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "task-by-month-partition-maintenance" in kubectl.run(
            "get", "cronjobs", "-o", "name"
        ):
            time.sleep(0.5)
        assert "task-by-month-partition-maintenance" not in kubectl.run("get", "cronjobs", "-o", "name")


def test_deleting_the_policy_mid_conversion_leaves_the_table_as_it_was(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 5000)
        before = rows(conn)
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        policy = load_example("partitionpolicy.yaml")[0]
        del policy["spec"]["retention"]
        policy["spec"]["conversion"].update(batchSize=100, pauseBetweenBatches="500ms")
        kubectl.apply(policy)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            obj = kubectl.get("partitionpolicy", "task-by-month")
            if (obj.get("status", {}).get("conversion") or {}).get("rowsDone"):
                break
            time.sleep(0.3)
        assert obj["metadata"].get("finalizers") == ["pgscale.io/cleanup"]
        assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgscale%'") == 2
        kubectl.run("delete", "partitionpolicy", "task-by-month", "--timeout=60s")
        assert scalar(conn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgscale%'") == 0
        assert scalar(conn, """SELECT to_regclass('"Task_pgscale_new"')""") is None
        assert scalar(conn, "SELECT relkind FROM pg_class WHERE relname = 'Task'") == "r"
        assert rows(conn) == before
    reasons = {e["reason"] for e in json.loads(kubectl.run("get", "events", "-o", "json"))["items"]}
    assert "ConversionAborted" in reasons
