"""The cloudnativepg settings method against CloudNativePG's own operator on the test node.

CloudNativePG's manager is built here from the module pinned in hack/cnpg/go.mod and runs as a
Deployment on the node (hack/cnpg_operator.py: its config/default manifests, its webhooks, its
own PKI); its Cluster runs pgscale's `postgres:15` image (hack/images.py). pgscale runs in its
pods (the chart, `operator_release`) and reaches the Cluster's `-rw` Service by cluster DNS,
with the `<cluster>-app` Secret CloudNativePG generates. What the test shows: pgscale's values
land in the Cluster's spec, CloudNativePG writes them into the running Postgres (SHOW in the
instance pod), rolls the restart a `postmaster` setting needs, and adds the instance
`readReplicas` asks for, which streams from the primary.

Opt-in (its cold build is the manager, several minutes on this machine): PGSCALE_CNPG_OPERATOR=1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cnpg_operator
import localenv
import pytest
import yaml

from conftest import Kubectl, wait_until

pytestmark = [
    pytest.mark.node,
    pytest.mark.cluster,
    pytest.mark.timeout(1800),  # a cold run builds CloudNativePG's manager first (about 7 minutes here)
    pytest.mark.skipif(
        os.environ.get("PGSCALE_CNPG_OPERATOR") != "1",
        reason="CloudNativePG's operator on the node is opt-in (its first build takes minutes): "
        "PGSCALE_CNPG_OPERATOR=1 uv run --frozen pytest tests/node/test_cloudnativepg_operator.py",
    ),
]


# pgscale's values: two a reload applies, one (shared_buffers) that needs the restart CloudNativePG rolls.
WANT = {"work_mem": "12MB", "random_page_cost": "1.1", "shared_buffers": "64MB"}


def story(k: Kubectl, cp: localenv.ControlPlane) -> str:
    """Pods, the Cluster's status and the CloudNativePG operator's last log lines, for a failure."""
    pods = k.run("get", "pods", "-o", "wide", check=False)
    cluster = k.run("get", "clusters", "-o", "jsonpath={.items[*].status}", check=False)
    op = cp.kubectl_run("-n", cnpg_operator.NAMESPACE, "logs", f"deploy/{cnpg_operator.DEPLOYMENT}", "--tail=30")
    return f"{pods}\nCluster status: {cluster[-3000:]}\nCloudNativePG operator:\n{op.stdout[-6000:]}"


@pytest.fixture(scope="module")
def cnpg(node_control_plane: localenv.ControlPlane, node: Any, node_images: dict[str, Path]) -> Iterator[None]:
    """CloudNativePG's operator Deployment Available on the node (CRDs, RBAC, webhooks)."""
    cp = node_control_plane
    t0 = time.monotonic()
    node.import_image(cnpg_operator.operator_archive())
    built = time.monotonic() - t0
    docs = cnpg_operator.manifests(cp.kubectl)
    text = "\n---\n".join(json.dumps(d) for d in docs)
    cp.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", "-", input=text, check=True)
    result = cp.kubectl_run(
        "-n",
        cnpg_operator.NAMESPACE,
        "wait",
        "--for=condition=Available",
        f"deploy/{cnpg_operator.DEPLOYMENT}",
        "--timeout=300s",
        timeout=330,
    )
    k = Kubectl(cp, cnpg_operator.NAMESPACE)
    assert result.returncode == 0, f"{result.stderr}\n{story(k, cp)}"
    sys.stderr.write(f"\nCloudNativePG operator: image {built:.1f}s, Available {time.monotonic() - t0:.1f}s\n")
    yield
    cp.kubectl_run(
        "delete",
        "-f",
        "-",
        "--wait=false",
        "--ignore-not-found",
        input="\n---\n".join(json.dumps(d) for d in docs if d["kind"] != "CustomResourceDefinition"),
    )


@pytest.fixture
def ns(node_control_plane: localenv.ControlPlane) -> Iterator[Kubectl]:
    cp = node_control_plane
    name = f"cnpg-{uuid.uuid4().hex[:6]}"
    cp.kubectl_run("create", "namespace", name, check=True)
    yield Kubectl(cp, name)
    cp.kubectl_run("delete", "databaseprofiles,clusters", "--all", "-n", name, "--wait=true", "--timeout=90s")
    cp.kubectl_run("delete", "namespace", name, "--wait=false")


def psql(k: Kubectl, pod: str, query: str) -> str:
    """A query as the postgres superuser inside the instance pod (CloudNativePG's socket, peer auth)."""
    out = k.cp.kubectl_run(
        "-n", k.namespace, "exec", pod, "-c", "postgres", "--", "psql", "-U", "postgres", "-tAX", "-c", query
    )
    assert out.returncode == 0, f"psql in {pod}: {out.stderr}"
    return out.stdout.strip()


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def test_profile_drives_cloudnativepg_cluster(cnpg: None, operator_release: Kubectl, ns: Kubectl) -> None:
    k = ns
    t0 = time.monotonic()
    cluster = {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "pg"},
        "spec": {
            "imageName": cnpg_operator.POSTGRES_IMAGE,
            "imagePullPolicy": "Never",
            "postgresUID": cnpg_operator.POSTGRES_UID,
            "postgresGID": cnpg_operator.POSTGRES_UID,
            "storage": {"size": "1Gi", "storageClass": "standard"},
            "primaryUpdateStrategy": "unsupervised",
        },
    }
    k.run("apply", "--server-side", "--field-manager=gitops", "-f", "-", input=yaml.safe_dump(cluster))

    def healthy(instances: int) -> bool:
        status = k.get("cluster", "pg").get("status", {})
        return bool(status.get("readyInstances") == instances and status.get("phase") == "Cluster in healthy state")

    try:
        wait_until(lambda: healthy(1), timeout=300, what="Cluster pg healthy with 1 instance")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{story(k, k.cp)}") from None
    first = time.monotonic() - t0
    assert psql(k, "pg-1", "SHOW work_mem") == "4MB"  # Postgres's default, before pgscale
    started = float(psql(k, "pg-1", "SELECT extract(epoch FROM pg_postmaster_start_time())"))

    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {
            # CloudNativePG's own app Secret; its fqdn-uri names pg-rw.<namespace>.svc.cluster.local.
            "connection": {"secretRef": {"name": "pg-app", "keys": {"uri": "fqdn-uri"}}},
            "settings": {"method": "cloudnativepg", "clusterRef": {"name": "pg"}},
            "parameters": WANT,
            "readReplicas": {
                "instances": 1,
                "replicationSecretRef": {"name": "unused-by-cloudnativepg"},
                "storage": {"size": "1Gi"},
            },
            "monitoring": {"enabled": False},
        },
    }
    k.apply(profile)

    # pgscale's values in the Cluster's spec, and the instance count.
    def patched() -> dict[str, Any] | None:
        spec = k.get("cluster", "pg")["spec"]
        return spec if spec.get("instances") == 2 and "work_mem" in spec["postgresql"].get("parameters", {}) else None

    spec = wait_until(patched, timeout=120, what="pgscale's values in Cluster pg")
    assert {n: spec["postgresql"]["parameters"].get(n) for n in WANT} == WANT

    # CloudNativePG applies them: a reload for work_mem, a rolling restart for shared_buffers, a second instance.
    want = WANT

    def running() -> bool:
        try:
            return all(psql(k, "pg-1", f"SHOW {n}") == v for n, v in want.items())
        except AssertionError:
            return False  # the pod restarting

    try:
        wait_until(running, timeout=300, what="the values running in pg-1")
        wait_until(lambda: healthy(2), timeout=300, what="Cluster pg healthy with 2 instances")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{story(k, k.cp)}") from None
    primary = k.get("cluster", "pg")["status"]["currentPrimary"]
    replica = next(p for p in ("pg-1", "pg-2") if p != primary)
    streaming = wait_until(
        lambda: psql(k, primary, "SELECT application_name || ' ' || state FROM pg_stat_replication") or None,
        timeout=120,
        what="a streaming replica",
    )
    assert streaming == f"{replica} streaming", streaming
    assert psql(k, replica, "SELECT pg_is_in_recovery()") == "t"
    # shared_buffers took a restart, which CloudNativePG rolled.
    assert float(psql(k, primary, "SELECT extract(epoch FROM pg_postmaster_start_time())")) > started
    assert {n: psql(k, replica, f"SHOW {n}") for n in want} == want

    # pgscale reads them back from the database: every value running, nothing waiting for a restart.
    def settled() -> dict[str, Any] | None:
        obj = k.get("databaseprofile", "app")
        params = obj.get("status", {}).get("parameters", [])
        done = params and all(p["effective"] == p["desired"] for p in params) and not condition(obj, "RestartRequired")
        if not done:
            k.run("annotate", "dbp", "app", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")
        return obj if done else None

    obj = wait_until(settled, timeout=180, what="the profile reading back every value")
    assert obj["status"]["settingsMethod"] == "cloudnativepg" and obj["status"]["cluster"] == "pg"
    assert (condition(obj, "Ready") or {}).get("status") == "True", obj["status"]
    sys.stderr.write(f"\nCluster healthy in {first:.1f}s; whole test {time.monotonic() - t0:.1f}s\n")
