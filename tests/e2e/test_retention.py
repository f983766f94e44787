"""RetentionPolicy end to end: the operator keeps the archive and the CronJob; the
CronJob's pod command, run for real with the Secret the kubelet would inject, moves
exactly the matching rows; status and Events report the run."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import psycopg
import pytest

from conftest import ROOT, Kubectl, run_container, scalar, seed_tasks

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

PREDICATE = """status = 'COMPLETED' AND "completedAt" < now() - interval '90 days'"""
CHECKSUM = """SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM (SELECT * FROM {}) t"""


def cluster_secrets(kubectl: Kubectl, *names: str) -> dict[str, dict[str, str]]:
    out = {}
    for name in names:
        data = kubectl.get("secret", name).get("data", {})
        out[name] = {k: base64.b64decode(v).decode() for k, v in data.items()}
    return out


def wait_status(kubectl: Kubectl, name: str, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl.get("retentionpolicy", name)
        if check(obj.get("status", {})):
            return obj
        time.sleep(0.5)
    raise AssertionError(f"status never matched: {json.dumps(obj.get('status'), indent=1)}")


def test_cronjob_command_archives_exactly_the_matching_rows(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 3000)
        expected = scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}')
        original = scalar(conn, CHECKSUM.format('"Task"'))
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        kubectl.run("apply", "-f", str(ROOT / "examples" / "retentionpolicy.yaml"))
        kubectl.wait("retentionpolicy", "archive-completed-tasks", "Ready")
        # The operator created the archive table with the source's columns and key.
        assert scalar(conn, """SELECT count(*) FROM "Task_archive" """) == 0
        events = json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
        assert any(e["reason"] == "ArchiveTableCreated" for e in events)

        cron = kubectl.get("cronjob", "archive-completed-tasks-retention")
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["args"][:2] == ["job", "retention"]
        assert "serviceAccountName" not in pod  # the job needs no Kubernetes API access
        result = run_container(pod, cluster_secrets(kubectl, "app-db"))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["outcome"] == "Succeeded" and report["rows_archived"] == expected
        assert "retention: " in result.stderr  # progress lines on the pod's log

        union = """(SELECT * FROM "Task" UNION ALL SELECT * FROM "Task_archive") u"""
        assert scalar(conn, CHECKSUM.format(union)) == original
        assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0

    # The run log reaches status (a Job's completion would trigger this; here we nudge).
    kubectl.run("annotate", "retentionpolicy", "archive-completed-tasks", "pgscale.io/reconcile-at=1", "--overwrite")
    obj = wait_status(kubectl, "archive-completed-tasks",
                      lambda s: s.get("lastRun", {}).get("outcome") == "Succeeded")  # fmt: skip
    assert obj["status"]["lastRun"]["rowsArchived"] == expected
    assert obj["status"]["totals"] == {"runs": 1, "rowsArchived": expected, "rowsDeleted": 0}
    last = next(c for c in obj["status"]["conditions"] if c["type"] == "LastRunSucceeded")
    assert last["status"] == "True" and last["reason"] == "RunSucceeded"
    table = kubectl.run("get", "rp", "archive-completed-tasks")
    assert "Succeeded" in table


def test_dry_run_reports_without_moving(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 1200)
        expected = scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}')
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.run("apply", "-f", str(ROOT / "examples" / "retentionpolicy.yaml"))
    kubectl.run("patch", "rp", "archive-completed-tasks", "--type=merge", "-p", '{"spec": {"dryRun": true}}')
    kubectl.wait("retentionpolicy", "archive-completed-tasks", "Ready")
    wait_status(kubectl, "archive-completed-tasks", lambda s: s.get("observedGeneration") == 2)
    pod = kubectl.get("cronjob", "archive-completed-tasks-retention")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    result = run_container(pod, cluster_secrets(kubectl, "app-db"))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "DryRun" and report["rows_matched"] == expected and report["rows_archived"] == 0
    kubectl.run("annotate", "rp", "archive-completed-tasks", "pgscale.io/reconcile-at=2", "--overwrite")
    obj = wait_status(kubectl, "archive-completed-tasks", lambda s: s.get("lastRun", {}).get("outcome") == "DryRun")
    assert obj["status"]["lastRun"]["rowsMatched"] == expected
