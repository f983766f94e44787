"""Finalizers never strand a namespace: pgscale holds one only while it has something outside
the cluster to clean, and lets go (with a Warning saying what stayed and how to remove it)
when the profile or Secret that cleanup needs is gone."""

from __future__ import annotations

import json
from typing import Any

import localenv
import psycopg
import pytest

from conftest import Kubectl, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

FINALIZER = "pgscale.io/cleanup"


def policy(name: str, profile: str, table: str = "Task") -> dict[str, Any]:
    return {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "PartitionPolicy",
        "metadata": {"name": name, "finalizers": [FINALIZER]},
        "spec": {
            "profileRef": {"name": profile},
            "table": {"name": table},
            "column": "createdAt",
            "interval": "monthly",
        },
    }


def profile(name: str, secret: str, finalizer: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **({"finalizers": [FINALIZER]} if finalizer else {})}
    return {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": meta,
        "spec": {"connection": {"secretRef": {"name": secret}}},
    }


def gone(kubectl: Kubectl, kind: str, name: str) -> bool:
    return kubectl.run("get", kind, name, "--ignore-not-found", "-o", "name") == ""


def warnings(kubectl: Kubectl, name: str, reason: str) -> list[str]:
    events = json.loads(kubectl.run("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json"))
    return [e["message"] for e in events["items"] if e["reason"] == reason and e["type"] == "Warning"]


def test_released_when_the_profile_or_secret_is_gone(operator: localenv.OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.apply(policy("orphan", "gone"))
    kubectl.apply(profile("no-secret", "missing", finalizer=True))
    wait_until(lambda: kubectl.get("partitionpolicy", "orphan").get("status"), what="the policy's status")
    kubectl.run("delete", "partitionpolicy", "orphan", "--wait=false")
    kubectl.run("delete", "databaseprofile", "no-secret", "--wait=false")
    wait_until(lambda: gone(kubectl, "partitionpolicy", "orphan"), what="the policy to go", log=operator.log)
    wait_until(lambda: gone(kubectl, "databaseprofile", "no-secret"), what="the profile to go", log=operator.log)
    [released] = warnings(kubectl, "orphan", "FinalizerReleased")
    assert "DatabaseProfile 'gone' not found" in released
    assert 'DROP TRIGGER IF EXISTS "pgscale_partition_sync" ON "public"."Task"' in released
    [released] = warnings(kubectl, "no-secret", "FinalizerReleased")
    assert "Secret 'missing' not found" in released and "pg_drop_replication_slot" in released


def test_namespace_deletion_is_not_stranded(
    operator: localenv.OperatorProcess, control_plane: localenv.ControlPlane, kubectl: Kubectl
) -> None:
    """The issue's case: the namespace goes with a policy whose profile may be deleted first."""
    kubectl.apply(profile("app", "missing"))
    kubectl.apply(policy("task-by-month", "app"))
    control_plane.kubectl_run("delete", "namespace", kubectl.namespace, "--wait=false", check=True)

    def namespace_gone() -> bool:
        result = control_plane.kubectl_run("get", "namespace", kubectl.namespace, "--ignore-not-found", "-o", "name")
        return result.stdout.strip() == ""

    wait_until(namespace_gone, timeout=120, what="the namespace to be deleted", log=operator.log)


def test_blocked_conversion_holds_no_finalizer(
    operator: localenv.OperatorProcess, kubectl: Kubectl, postgres: localenv.Postgres, database: str, app_secret: str
) -> None:
    """A conversion refused before its first step changed nothing: nothing to clean, no finalizer."""
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute('CREATE TABLE "NoKey" ("createdAt" timestamptz NOT NULL, note text)')
    kubectl.apply(profile("app", app_secret))
    blocked = policy("no-key", "app", table="NoKey")
    blocked["metadata"].pop("finalizers")
    kubectl.apply(blocked)

    def stalled() -> dict[str, Any] | None:
        obj = kubectl.get("partitionpolicy", "no-key")
        conditions: list[dict[str, Any]] = obj.get("status", {}).get("conditions", [])
        ready = next((c for c in conditions if c["type"] == "Ready"), {})
        return obj if ready.get("reason") == "ConversionBlocked" else None

    obj = wait_until(stalled, what="ConversionBlocked", log=operator.log)
    assert FINALIZER not in (obj["metadata"].get("finalizers") or [])
    kubectl.run("delete", "partitionpolicy", "no-key", "--timeout=30s")
