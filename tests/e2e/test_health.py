"""Health as tools outside pgscale read it, on live objects written by the operator:
kstatus (what `kubectl wait`, Flux and cli-utils use) and Argo CD's Lua health check
from manifests/argocd, run by a real Lua 5.1 on the objects the API server returns."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51  # type: ignore[import-untyped]
import psycopg
import pytest
import yaml

from conftest import ROOT, Kubectl, load_example
from pgscale import api

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

EXAMPLES = ["databaseprofile.yaml", "partitionpolicy.yaml", "retentionpolicy.yaml", "filemigration.yaml"]
ARGOCD = ROOT / "manifests" / "argocd"
SCRIPT = (ARGOCD / "health.lua").read_text()


def argo_health(obj: dict[str, Any]) -> dict[str, str]:
    """Argo CD's way of running a health script: the resource in the global `obj`, {status, message} back."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return {str(k): str(v) for k, v in lua.execute(SCRIPT).items()}


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def kstatus(obj: dict[str, Any]) -> str:
    """sigs.k8s.io/cli-utils kstatus's rules for a custom resource with a Ready condition."""
    meta, status = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    if status.get("observedGeneration") != meta["generation"]:
        return "InProgress"
    conds = conditions(obj)
    if conds.get("Stalled", {}).get("status") == "True":
        return "Failed"
    if conds.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    return "Current" if conds.get("Ready", {}).get("status") == "True" else "InProgress"


def assert_kstatus_conventions(obj: dict[str, Any]) -> None:
    """What kstatus and `kubectl wait` rely on: Ready always there, abnormal-true conditions only while
    True, every condition set for the generation the status reports."""
    conds = conditions(obj)
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    assert "Ready" in conds, f"{name}: no Ready condition"
    for ctype in ("Reconciling", "Stalled"):
        assert conds.get(ctype, {"status": "True"})["status"] == "True", f"{name}: {ctype} present but not True"
    for c in conds.values():
        assert c["observedGeneration"] == obj["status"]["observedGeneration"], f"{name}: {c['type']} is stale"
        assert c["reason"], f"{name}: {c['type']} has no reason"


def wait_status(kubectl: Kubectl, kind: str, name: str, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl.get(kind, name)
        if obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"] and check(obj):
            return obj
        time.sleep(0.5)
    raise AssertionError(f"{kind}/{name}: {json.dumps(obj.get('status'), indent=1)}")


def test_examples_are_current_and_healthy(operator: Any, kubectl: Kubectl, app_secret: str) -> None:
    kubectl.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    for example in EXAMPLES:
        kubectl.run("apply", "-f", str(ROOT / "examples" / example))
    kinds = set()
    for example in EXAMPLES:
        for doc in load_example(example):
            kind, name = doc["kind"], doc["metadata"]["name"]
            kubectl.wait(kind.lower(), name, "Ready", timeout=90)
            obj = kubectl.get(kind.lower(), name)
            assert_kstatus_conventions(obj)
            assert kstatus(obj) == "Current", obj["status"]
            health = argo_health(obj)
            assert health["status"] == "Healthy", health
            assert health["message"].startswith(conditions(obj)["Ready"]["reason"])
            kinds.add(kind)
    assert kinds == {"DatabaseProfile", "PartitionPolicy", "RetentionPolicy", "FileMigration"}

    # Suspending a Ready policy: kstatus still Current (nothing is wrong), Argo CD shows Suspended.
    kubectl.run("patch", "rp", "archive-completed-tasks", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    obj = wait_status(kubectl, "retentionpolicy", "archive-completed-tasks", lambda o: kstatus(o) == "Current")
    assert argo_health(obj)["status"] == "Suspended"


def test_stalled_is_failed_and_degraded(operator: Any, kubectl: Kubectl) -> None:
    """A profile whose Secret is missing, and a policy whose profile is missing."""
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.run("apply", "-f", str(ROOT / "examples" / "retentionpolicy.yaml"))
    kubectl.apply({**load_example("filemigration.yaml")[0], "metadata": {"name": "orphan"}})
    kubectl.run("patch", "fm", "orphan", "--type=merge", "-p", '{"spec": {"profileRef": {"name": "nowhere"}}}')
    for kind, name, reason in [
        ("databaseprofile", "app", "SecretNotFound"),
        ("filemigration", "orphan", "ProfileNotFound"),
    ]:
        kubectl.wait(kind, name, "Stalled", timeout=60)
        obj = wait_status(kubectl, kind, name, lambda o: "Stalled" in conditions(o))
        assert_kstatus_conventions(obj)
        assert kstatus(obj) == "Failed"
        health = argo_health(obj)
        assert health["status"] == "Degraded"
        assert health["message"] == f"{reason}: {conditions(obj)['Stalled']['message']}"
    # The policy on the broken profile is not Current either, whatever reason it gives.
    obj = wait_status(kubectl, "retentionpolicy", "archive-completed-tasks", lambda o: "Ready" in conditions(o))
    assert kstatus(obj) != "Current" and argo_health(obj)["status"] != "Healthy"


def test_work_under_way_is_in_progress(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    """A FileMigration with a row to move: its Job cannot run (no kubelet), so the work stays under way."""
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(
            """INSERT INTO "File" (id, "fileName", size, data) VALUES ('f1', 'a.txt', 2, %s)""",
            (base64.b64encode(b"hi").decode(),),
        )
    kubectl.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.run("apply", "-f", str(ROOT / "examples" / "filemigration.yaml"))
    obj = wait_status(kubectl, "filemigration", "files-to-s3", lambda o: "Reconciling" in conditions(o))
    assert_kstatus_conventions(obj)
    assert kstatus(obj) == "InProgress"
    reconciling = conditions(obj)["Reconciling"]
    assert obj["status"]["phase"] == reconciling["reason"] == "CuttingOver"  # the example goes up to cutover
    assert argo_health(obj) == {"status": "Progressing", "message": f"CuttingOver: {reconciling['message']}"}
    # `kubectl wait` gives up on it, as on any resource that is not Ready.
    result = kubectl.cp.kubectl_run(
        "-n", kubectl.namespace, "wait", "--for=condition=Ready", "fm/files-to-s3", "--timeout=2s"
    )
    assert result.returncode != 0
    kubectl.run("patch", "fm", "files-to-s3", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    obj = wait_status(
        kubectl, "filemigration", "files-to-s3", lambda o: conditions(o)["Ready"]["reason"] == "Suspended"
    )
    assert argo_health(obj)["status"] == "Suspended"
    assert kstatus(obj) != "Failed"


def test_argocd_cm_patch_applies(control_plane: Any, kubectl: Kubectl) -> None:
    """The snippet merges into a real argocd-cm ConfigMap, each key holding the script unchanged."""
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "argocd-cm"},
            "data": {"url": "https://argocd.example"},
        }
    )
    patch = ARGOCD / "argocd-cm-patch.yaml"
    kubectl.run("patch", "configmap", "argocd-cm", "--type=merge", f"--patch-file={patch}")
    data = kubectl.get("configmap", "argocd-cm")["data"]
    keys = sorted(k for k in data if k.startswith("resource.customizations.health."))
    assert keys == [f"resource.customizations.health.pgscale.io_{k}" for k in sorted(kind.name for kind in api.KINDS)]
    assert all(data[k] == SCRIPT for k in keys) and data["url"] == "https://argocd.example"
    assert yaml.safe_load(Path(patch).read_text())["data"] == {k: data[k] for k in keys}
