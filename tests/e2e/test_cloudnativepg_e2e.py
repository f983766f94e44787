"""The cloudnativepg settings method against CloudNativePG's real CRDs in the local kube-apiserver.

The CRDs (Cluster, Pooler) come from the CloudNativePG module pinned in hack/cnpg/go.mod
(hack/cnpg/crds.sh: Go module proxy, verified against go.sum, cached in
~/.cache/pgscale/cnpg/<version>/). A `Cluster` is seeded with server-side apply by another
field manager ("argocd"), as GitOps would; the profile's database is a real PostgreSQL
(private to the test) whose Secret carries CloudNativePG's `cnpg.io/cluster` label. The
operator runs as the chart's ServiceAccount (so rbac.py's rules are what it has).

No CloudNativePG operator runs here, and neither does its admission webhook: the patched
Cluster and the Poolers are validated by the API server against the CRDs' OpenAPI schemas
only. Where the test needs what CloudNativePG's instance manager would do (write the
Cluster's parameters into the server's configuration and reload, restart for the rest), it
does that itself, with ALTER SYSTEM and a restart of the test's server.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import localenv
import psycopg
import pytest
import yaml

from conftest import ROOT, Kubectl, scalar, wait_until
from pgscale.specs import cnpg

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

CRDS_SCRIPT = ROOT / "hack" / "cnpg" / "crds.sh"
CRDS = ("clusters.postgresql.cnpg.io", "poolers.postgresql.cnpg.io")
# The strategy's nine values (examples/databaseprofile.yaml).
STRATEGY = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "effective_cache_size": "1GB",
    "work_mem": "4MB",
    "maintenance_work_mem": "64MB",
    "checkpoint_completion_target": "0.9",
    "wal_buffers": "16MB",
    "random_page_cost": "1.1",
    "effective_io_concurrency": "200",
}
MANAGER = cnpg.field_manager("app")


def _ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, f"{what} failed ({result.returncode}): {result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def cnpg_crds(control_plane: localenv.ControlPlane) -> list[Path]:
    """CloudNativePG's Cluster and Pooler CRDs, installed and Established."""
    out = _ok(subprocess.run([str(CRDS_SCRIPT)], capture_output=True, text=True, timeout=600), str(CRDS_SCRIPT))
    paths = [Path(line) for line in out.splitlines() if line.strip()]
    assert [p.name for p in paths] == [f"postgresql.cnpg.io_{crd.split('.')[0]}.yaml" for crd in CRDS]
    for path in paths:
        _ok(control_plane.kubectl_run("apply", "--server-side", "-f", str(path)), f"kubectl apply {path}")

    def established() -> bool:
        args = ("wait", "--for=condition=Established", *(f"crd/{c}" for c in CRDS), "--timeout=10s")
        return control_plane.kubectl_run(*args).returncode == 0  # fails until a CRD has any condition

    wait_until(established, timeout=90, what="CloudNativePG's CRDs Established")
    return paths


def module_source(relative: str) -> str:
    out = _ok(subprocess.run([str(CRDS_SCRIPT), "--source"], capture_output=True, text=True, timeout=600), "source")
    return (Path(out.strip()) / relative).read_text()


def go_block(source: str, start: str) -> str:
    """The text from `start` to the closing brace of the block it opens."""
    head = source.index(start)
    depth = 0
    for i in range(source.index("{", head), len(source)):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        if depth == 0:
            return source[head:i]
    raise AssertionError(f"no end of {start}")


def test_parameter_lists_match_the_pinned_module() -> None:
    """specs/cnpg.py's copies of CloudNativePG's lists are the pinned version's."""
    fixed = go_block(module_source("pkg/postgres/configuration.go"), "FixedConfigurationParameters = map")
    assert sorted(re.findall(r'^\s*"([^"]+)":', fixed, re.M)) == list(cnpg.FIXED_PARAMETERS)
    allowed = go_block(
        module_source("internal/webhook/v1/pooler_webhook.go"), "AllowedPgbouncerGenericConfigurationParameters"
    )
    assert sorted(re.findall(r'"([a-z_]+)",', allowed)) == list(cnpg.PGBOUNCER_PARAMETERS)


def seed_cluster(kubectl: Kubectl, name: str, parameters: dict[str, str], instances: int | None = 1) -> None:
    """The Cluster as a GitOps tool applies it: server-side apply under the field manager "argocd"."""
    spec: dict[str, Any] = {
        "imageName": "ghcr.io/cloudnative-pg/postgresql:17.5",
        "storage": {"size": "1Gi"},
        "primaryUpdateStrategy": "unsupervised",
        "postgresql": {"parameters": parameters},
    }
    if instances is not None:
        spec["instances"] = instances
    obj = {"apiVersion": cnpg.API_VERSION, "kind": "Cluster", "metadata": {"name": name}, "spec": spec}
    kubectl.run("apply", "--server-side", "--field-manager=argocd", "-f", "-", input=yaml.safe_dump(obj))


def get_cluster(kubectl: Kubectl, name: str) -> dict[str, Any]:
    """The Cluster with its managedFields (kubectl leaves them out unless asked)."""
    return dict(json.loads(kubectl.run("get", "cluster", name, "-o", "json", "--show-managed-fields")))


def fields_of(obj: dict[str, Any], manager: str) -> dict[str, Any]:
    entries = [m for m in obj["metadata"].get("managedFields", []) if m["manager"] == manager]
    assert len(entries) <= 1, entries
    return entries[0]["fieldsV1"] if entries else {}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def profile_until(kubectl: Kubectl, check: Callable[[dict[str, Any]], Any], what: str, timeout: float = 90) -> Any:
    last: dict[str, Any] = {}

    def probe() -> Any:
        nonlocal last
        last = kubectl.get("databaseprofile", "app")
        return last if check(last) else None

    try:
        return wait_until(probe, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{json.dumps(last.get('status'), indent=1)}") from None


def nudge(kubectl: Kubectl) -> None:
    kubectl.run("annotate", "dbp", "app", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")


def events(kubectl: Kubectl) -> list[tuple[str, str]]:
    items = json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
    return [(e["reason"], e["message"]) for e in items if e["involvedObject"]["name"] == "app"]


def act_as_cloudnativepg(server: localenv.Postgres, parameters: dict[str, str]) -> None:
    """What CloudNativePG's instance manager does with the Cluster's parameters: write and reload."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for name, value in parameters.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")  # test data: fixed names and values
        conn.execute("SELECT pg_reload_conf()")


def test_profile_patches_the_cluster_and_gives_back_only_its_fields(
    operator: Any, kubectl: Kubectl, cnpg_crds: list[Path], private_postgres: localenv.Postgres
) -> None:
    server = private_postgres
    # GitOps owns the Cluster, including a max_connections of its own and the instance count.
    seed_cluster(kubectl, "pg", {"max_connections": "100", "log_min_duration_statement": "1000"})
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "app-db", "labels": {cnpg.CLUSTER_LABEL: "pg", "cnpg.io/reload": "true"}},
            "stringData": {"uri": server.uri("postgres")},
        }
    )
    profile = yaml.safe_load((ROOT / "examples" / "databaseprofile.yaml").read_text())
    profile["spec"]["settings"] = {"method": "cloudnativepg"}  # the Cluster's name from the Secret's label
    profile["spec"]["readReplicas"] = {
        "instances": 2,
        "replicationSecretRef": {"name": "unused-by-cloudnativepg"},
        "storage": {"size": "1Gi"},
    }
    profile["spec"]["pooling"] = {
        "instances": 2,
        "poolMode": "transaction",
        "parameters": {"server_idle_timeout": "60"},
    }
    kubectl.apply(profile)
    cluster_before = get_cluster(kubectl, "pg")

    # 1. argocd holds max_connections (100) and instances (1): pgscale stops, naming both, and changes nothing.
    obj = profile_until(
        kubectl, lambda o: (condition(o, "Stalled") or {}).get("reason") == "ClusterFieldConflict", "the conflict"
    )
    message = condition(obj, "Stalled")["message"]  # type: ignore[index]
    assert "spec.postgresql.parameters.max_connections = '100' (held by 'argocd')" in message, message
    assert "spec.instances = 1 (held by 'argocd')" in message, message
    assert get_cluster(kubectl, "pg")["metadata"]["resourceVersion"] == cluster_before["metadata"]["resourceVersion"]

    # 2. The documented way out: argocd stops applying those two fields (they leave its manifest).
    seed_cluster(kubectl, "pg", {"log_min_duration_statement": "1000"}, instances=None)
    nudge(kubectl)
    obj = profile_until(kubectl, lambda o: (condition(o, "Ready") or {}).get("status") == "True", "Ready")
    cluster = get_cluster(kubectl, "pg")
    params = cluster["spec"]["postgresql"]["parameters"]
    assert params == {**STRATEGY, "log_min_duration_statement": "1000"}  # accepted by the CRD's schema as sent
    assert cluster["spec"]["instances"] == 3  # the primary and readReplicas.instances: 2
    ours = fields_of(cluster, MANAGER)["f:spec"]
    assert set(ours) == {"f:instances", "f:postgresql"}
    assert set(ours["f:postgresql"]["f:parameters"]) == {f"f:{n}" for n in STRATEGY}
    theirs = fields_of(cluster, "argocd")["f:spec"]  # untouched: still argocd's, and only argocd's
    assert set(theirs) == {"f:imageName", "f:storage", "f:primaryUpdateStrategy", "f:postgresql"}
    assert set(theirs["f:postgresql"]["f:parameters"]) == {"f:log_min_duration_statement"}
    assert cluster["spec"]["imageName"] == "ghcr.io/cloudnative-pg/postgresql:17.5"
    assert [m["manager"] for m in cluster["metadata"]["managedFields"]] == ["argocd", MANAGER]

    status = obj["status"]
    assert status["settingsMethod"] == "cloudnativepg" and status["cluster"] == "pg"
    assert "cnpg.io/cluster label" in status["settingsMethodReason"]
    reported = {p["name"]: p for p in status["parameters"]}
    assert {n: p["desired"] for n, p in reported.items()} == STRATEGY
    assert all(p["applied"] for p in reported.values())
    # Read back from the database: no CloudNativePG here to apply them, so most do not run yet.
    assert reported["max_connections"]["effective"] == "200"  # the test server's own setting
    assert reported["shared_buffers"]["effective"] == "128MB"
    pending = condition(obj, "ClusterParametersPending")
    assert (
        pending is not None and "shared_buffers" in pending["message"] and "max_connections" not in pending["message"]
    )

    for role in ("rw", "ro"):
        pooler = kubectl.get("pooler", f"app-pooler-{role}")
        assert pooler["spec"]["cluster"] == {"name": "pg"} and pooler["spec"]["type"] == role
        assert pooler["spec"]["instances"] == 2
        assert pooler["spec"]["pgbouncer"]["poolMode"] == "transaction"
        assert pooler["spec"]["pgbouncer"]["parameters"]["server_idle_timeout"] == "60"
        assert pooler["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert status["pooler"] == {
        "service": "app-pooler-rw",
        "readOnlyService": "app-pooler-ro",
        "instances": 2,
        "configHash": status["pooler"]["configHash"],
    }
    assert not kubectl.run("get", "statefulsets,deployments", "-o", "name").strip()  # none of pgscale's own
    reasons = [r for r, _ in events(kubectl)]
    assert "ClusterParametersApplied" in reasons and "ClusterInstancesSet" in reasons

    # 3. CloudNativePG writes the parameters and reloads: two wait for the restart it rolls.
    act_as_cloudnativepg(server, params)
    nudge(kubectl)
    obj = profile_until(kubectl, lambda o: condition(o, "RestartRequired") is not None, "RestartRequired")
    assert sorted(obj["status"]["pendingRestart"]) == ["shared_buffers", "wal_buffers"]
    assert "CloudNativePG restarts the instances" in condition(obj, "RestartRequired")["message"]  # type: ignore[index]
    assert condition(obj, "ClusterParametersPending") is None
    server.stop()
    server.start()
    nudge(kubectl)
    obj = profile_until(
        kubectl,
        lambda o: (
            condition(o, "RestartRequired") is None
            and all(p["effective"] == p["desired"] for p in o["status"]["parameters"])
        ),
        "every value running",
    )
    with psycopg.connect(server.dsn()) as conn:
        assert {n: str(scalar(conn, f"SHOW {n}")) for n in STRATEGY} == STRATEGY

    # 4. Deleting the profile gives back exactly its fields and removes its Poolers.
    kubectl.run("delete", "databaseprofile", "app", "--timeout=90s")
    cluster = get_cluster(kubectl, "pg")
    assert cluster["spec"]["postgresql"]["parameters"] == {"log_min_duration_statement": "1000"}
    assert cluster["spec"]["instances"] == 1  # nobody holds it now: the CRD's default
    assert [m["manager"] for m in cluster["metadata"]["managedFields"]] == ["argocd"]
    assert fields_of(cluster, "argocd")["f:spec"] == theirs
    wait_until(lambda: not kubectl.run("get", "poolers", "-o", "name").strip(), timeout=60, what="Poolers deleted")


def test_cluster_named_by_ref_missing_then_found_and_fixed_settings_reported(
    operator: Any, kubectl: Kubectl, cnpg_crds: list[Path], private_postgres: localenv.Postgres
) -> None:
    kubectl.secret("app-db", {"uri": private_postgres.uri("postgres")})  # no label: clusterRef names it
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {
            "connection": {"secretRef": {"name": "app-db"}},
            "settings": {"method": "cloudnativepg", "clusterRef": {"name": "db"}},
            "parameters": {"work_mem": "8MB", "shared_preload_libraries": "pg_stat_statements"},
            "monitoring": {"enabled": False},
        },
    }
    kubectl.apply(profile)
    obj = profile_until(
        kubectl, lambda o: (condition(o, "Stalled") or {}).get("reason") == "ClusterNotFound", "ClusterNotFound"
    )
    message = condition(obj, "Stalled")["message"]  # type: ignore[index]
    assert "Cluster 'db' not found" in message and "spec.settings.clusterRef.name" in message, message

    seed_cluster(kubectl, "db", {})
    nudge(kubectl)
    obj = profile_until(kubectl, lambda o: (condition(o, "Ready") or {}).get("status") == "True", "Ready")
    params = get_cluster(kubectl, "db")["spec"]["postgresql"]["parameters"]
    assert params == {"work_mem": "8MB"}  # shared_preload_libraries is CloudNativePG's: reported, not sent
    applied = {p["name"]: p["applied"] for p in obj["status"]["parameters"]}
    assert applied == {"work_mem": True, "shared_preload_libraries": False}
    refused = condition(obj, "ParametersNotApplied")
    assert refused is not None and "spec.postgresql.shared_preload_libraries" in refused["message"]
    assert "ParametersNotApplied" in [r for r, _ in events(kubectl)]
    assert "instances" not in fields_of(get_cluster(kubectl, "db"), MANAGER)["f:spec"]  # no readReplicas
    assert not kubectl.run("get", "poolers", "-o", "name").strip()  # no pooling

    # A bad value stops the change before the Cluster sees it.
    kubectl.run("patch", "dbp", "app", "--type=merge", "-p", '{"spec":{"parameters":{"work_mem":"lots"}}}')
    obj = profile_until(
        kubectl, lambda o: (condition(o, "Stalled") or {}).get("reason") == "InvalidParameter", "InvalidParameter"
    )
    assert "nothing was applied to Cluster db" in condition(obj, "Stalled")["message"]  # type: ignore[index]
    assert get_cluster(kubectl, "db")["spec"]["postgresql"]["parameters"] == {"work_mem": "8MB"}

    # Leaving the method gives the Cluster's fields back.
    kubectl.run(
        "patch",
        "dbp",
        "app",
        "--type=merge",
        "-p",
        '{"spec":{"settings":{"method":"alterSystem","clusterRef":null},"parameters":{"work_mem":"8MB",'
        '"shared_preload_libraries":null}}}',
    )
    obj = profile_until(
        kubectl,
        lambda o: (condition(o, "Ready") or {}).get("status") == "True" and not o["status"].get("cluster"),
        "Ready without the Cluster",
    )
    cluster = get_cluster(kubectl, "db")
    assert (cluster["spec"].get("postgresql") or {}).get("parameters", {}) == {}
    assert MANAGER not in [m["manager"] for m in cluster["metadata"]["managedFields"]]
    assert "ClusterFieldsReleased" in [r for r, _ in events(kubectl)]
