"""The operator against the real control plane and a real Postgres: examples reach
Ready, problems surface as Stalled with the field and the fix, deletion is prompt
and owned objects are garbage-collected by the real controller-manager."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from conftest import ROOT, Kubectl, load_example, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

EXAMPLES = ["databaseprofile.yaml", "partitionpolicy.yaml", "retentionpolicy.yaml", "filemigration.yaml"]


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def test_examples_reach_ready(operator: Any, kubectl: Kubectl, postgres: Any, app_secret: str) -> None:
    kubectl.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    for example in EXAMPLES:
        kubectl.run("apply", "-f", str(ROOT / "examples" / example))
    for example in EXAMPLES:
        for doc in load_example(example):
            kind, name = doc["kind"].lower(), doc["metadata"]["name"]
            kubectl.wait(kind, name, "Ready", timeout=60)
            obj = kubectl.get(kind, name)
            assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
            assert condition(obj, "Reconciling") is None and condition(obj, "Stalled") is None
            # pgscale leaves no kopf annotations and no finalizer where none is needed.
            assert not obj["metadata"].get("finalizers")
            assert not any("kopf" in a for a in obj["metadata"].get("annotations", {}))
    profile = kubectl.get("databaseprofile", "app")
    assert profile["status"]["serverVersion"].startswith(f"{postgres.major}.")
    cron = kubectl.get("cronjob", "archive-completed-tasks-retention")
    assert cron["spec"]["schedule"] == "0 2 1 * *"
    assert cron["metadata"]["ownerReferences"][0]["kind"] == "RetentionPolicy"
    table = kubectl.run("get", "pgscale", "-o", "wide")
    assert "task-by-month" in table and "Connected to PostgreSQL" in table


def test_missing_secret_stalls_then_recovers(operator: Any, kubectl: Kubectl, postgres: Any, database: str) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.wait("databaseprofile", "app", "Stalled", timeout=60)
    stalled = condition(kubectl.get("databaseprofile", "app"), "Stalled")
    assert stalled is not None and stalled["reason"] == "SecretNotFound"
    assert "'app-db'" in stalled["message"] and "spec.connection.secretRef.name" in stalled["message"]
    events = kubectl.run("get", "events", "--field-selector", "involvedObject.name=app", "-o", "json")
    assert any(e["reason"] == "SecretNotFound" and e["type"] == "Warning" for e in json.loads(events)["items"])
    # Zalando's layout: only credentials in the Secret, host and database in the spec.
    kubectl.secret("app-db", {"username": "postgres", "password": postgres.PASSWORD})
    kubectl.run(
        "patch",
        "databaseprofile",
        "app",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"connection": {"host": postgres.host, "port": postgres.port, "dbname": database}}}),
    )
    kubectl.wait("databaseprofile", "app", "Ready", timeout=60)
    assert condition(kubectl.get("databaseprofile", "app"), "Stalled") is None


def test_database_problems_name_the_field_and_fix(operator: Any, kubectl: Kubectl, app_secret: str) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.wait("databaseprofile", "app", "Ready")
    policy = load_example("partitionpolicy.yaml")[0]
    policy["spec"]["table"]["name"] = "task"  # the table is "Task": names are case-sensitive
    kubectl.apply(policy)
    kubectl.wait("partitionpolicy", "task-by-month", "Stalled")
    stalled = condition(kubectl.get("partitionpolicy", "task-by-month"), "Stalled")
    assert stalled is not None and stalled["reason"] == "TableNotFound"
    assert 'spec.table: table "public"."task" does not exist' in stalled["message"]
    retention = load_example("retentionpolicy.yaml")[0]
    retention["spec"]["ageColumn"] = "completedat"
    kubectl.apply(retention)
    kubectl.wait("retentionpolicy", retention["metadata"]["name"], "Stalled")
    stalled = condition(kubectl.get("retentionpolicy", retention["metadata"]["name"]), "Stalled")
    assert stalled is not None and stalled["reason"] == "ColumnNotFound"
    assert "spec.ageColumn" in stalled["message"] and "did you mean 'completedAt'" in stalled["message"]
    # Fixing the spec clears Stalled; the new generation is observed.
    retention["spec"]["ageColumn"] = "completedAt"
    kubectl.apply(retention)
    kubectl.wait("retentionpolicy", retention["metadata"]["name"], "Ready")
    obj = kubectl.get("retentionpolicy", retention["metadata"]["name"])
    assert obj["status"]["observedGeneration"] == 2


def test_profile_not_found(operator: Any, kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples" / "filemigration.yaml"))
    kubectl.wait("filemigration", "files-to-s3", "Stalled")
    stalled = condition(kubectl.get("filemigration", "files-to-s3"), "Stalled")
    assert stalled is not None and stalled["reason"] == "ProfileNotFound"
    assert "spec.profileRef.name" in stalled["message"]


def test_delete_is_prompt_and_owned_objects_are_collected(operator: Any, kubectl: Kubectl, app_secret: str) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.run("apply", "-f", str(ROOT / "examples" / "retentionpolicy.yaml"))
    kubectl.wait("retentionpolicy", "archive-completed-tasks", "Ready")
    kubectl.get("cronjob", "archive-completed-tasks-retention")
    started = time.monotonic()
    kubectl.run("delete", "retentionpolicy", "archive-completed-tasks", "--timeout=30s")
    kubectl.run("delete", "databaseprofile", "app", "--timeout=30s")
    assert time.monotonic() - started < 10
    wait_until(
        lambda: (
            "NotFound"
            in kubectl.cp.kubectl_run(
                "-n", kubectl.namespace, "get", "cronjob", "archive-completed-tasks-retention"
            ).stderr
        ),
        timeout=60,
        what="CronJob garbage-collected",
    )


def test_metrics_endpoint_counts_reconciles(operator: Any, kubectl: Kubectl, app_secret: str) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.wait("databaseprofile", "app", "Ready")
    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    assert 'pgscale_reconcile_total{kind="DatabaseProfile",outcome="success"}' in text
    assert "pgscale_reconcile_duration_seconds_bucket" in text
