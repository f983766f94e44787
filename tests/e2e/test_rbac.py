"""The operator's permissions: exactly operator/pgscale/rbac.py, enough, and each tested rule needed.

- The ClusterRole the e2e `operator` fixture runs under (manifests/, rendered from the chart) is
  rbac.py's list, and the API server's own authorizer agrees (`kubectl auth can-i --as`).
- In a cluster of this module's own, an operator runs in watch-namespace mode under the chart's
  Role for one namespace: with the Role as rendered, a DatabaseProfile with a pooler becomes
  Ready; with one rule taken out of a copy of it, the same profile visibly fails (a Forbidden in
  its condition or in the operator's log). So the e2e suite passing under these rules means
  something: it would notice a missing permission.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import localenv
import pytest
import yaml

from conftest import ROOT, started_control_plane, wait_until
from pgscale import rbac

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "pgscale"
SA = "system:serviceaccount:pgscale-system:pgscale"
Rules = list[dict[str, Any]]


def helm() -> str:
    out = subprocess.run([str(ROOT / "hack" / "build-helm.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def can_i(cp: localenv.ControlPlane, user: str, *args: str) -> bool:
    result = cp.kubectl_run("auth", "can-i", *args, f"--as={user}")
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def test_installed_rules_are_rbac_py(control_plane: localenv.ControlPlane, operator_kubeconfig: Path) -> None:
    role = json.loads(control_plane.kubectl_run("get", "clusterrole", "pgscale", "-o", "json", check=True).stdout)
    assert role["rules"] == [r.as_policy_rule() for r in (*rbac.NAMESPACED, *rbac.CLUSTER)]
    assert localenv.ADMIN_TOKEN not in operator_kubeconfig.read_text()  # the ServiceAccount's token, not admin's
    allowed = [
        ("patch", "databaseprofiles.pgscale.io", "--subresource=status", "-n", "any"),
        ("list", "retentionpolicies.pgscale.io", "-A"),
        ("get", "secrets", "-n", "any"),
        ("create", "events", "-n", "any"),
        ("delete", "statefulsets.apps", "-n", "any"),
        ("watch", "jobs.batch", "-A"),
        ("update", "databaseprofiles.pgscale.io", "--subresource=finalizers", "-n", "any"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ]
    denied = [
        ("list", "secrets", "-A"),  # only the Secrets a profile names, by name
        ("watch", "secrets", "-n", "any"),
        ("get", "pods", "-n", "any"),
        ("create", "pods", "-n", "any"),
        ("update", "databaseprofiles.pgscale.io", "-n", "any"),  # the spec is the user's
        ("delete", "databaseprofiles.pgscale.io", "-n", "any"),
        ("patch", "filemigrations.pgscale.io", "-n", "any"),  # no finalizer on this kind
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "namespaces"),  # only in watch-namespace mode
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "serviceaccounts/token", "-n", "pgscale-system"),
    ]
    assert [a for a in allowed if not can_i(control_plane, SA, *a)] == []
    assert [d for d in denied if can_i(control_plane, SA, *d)] == []


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localenv.ControlPlane]:
    """A control plane only this module's operators watch, so nothing else reconciles its resources."""
    with started_control_plane(tmp_path_factory.mktemp("rbac-cluster")) as cp:
        yield cp


def without(resources: list[str], verb: str | None = None) -> Callable[[Rules], Rules]:
    """A copy of the rules without `verb` (or every verb) on the rule for exactly these resources."""

    def mutate(rules: Rules) -> Rules:
        out = []
        for rule in rules:
            if rule["resources"] == resources:
                assert verb is None or verb in rule["verbs"], (rule, verb)
                rule = {**rule, "verbs": [v for v in rule["verbs"] if verb is not None and v != verb]}
                if not rule["verbs"]:
                    continue
            out.append(rule)
        assert out != rules, f"no rule for {resources}"
        return out

    return mutate


STATUS = [f"{k}/status" for k in rbac.KINDS]
# case -> (how the Role changes, a `kubectl auth can-i` it turns to "no", what the API server then answers)
CASES: dict[str, tuple[Callable[[Rules], Rules] | None, tuple[str, ...], str]] = {
    "as-rendered": (None, (), ""),
    "no-get-secrets": (without(["secrets"], "get"), ("get", "secrets"), 'cannot get resource "secrets"'),
    # A server-side apply that creates the object is authorized as create too, not only as patch.
    "no-create-owned": (
        without(["secrets", "services", "configmaps"], "create"),
        ("create", "secrets"),
        'cannot create resource "secrets"',
    ),
    "no-status-patch": (
        without(STATUS),
        ("patch", "databaseprofiles.pgscale.io", "--subresource=status"),
        'cannot patch resource "databaseprofiles/status"',
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_operator_needs_its_rules(
    own_cluster: localenv.ControlPlane, postgres: localenv.Postgres, database: str, tmp_path: Path, case: str
) -> None:
    cp = own_cluster
    mutate, denied, answer = CASES[case]
    ns = f"t-{uuid.uuid4().hex[:10]}"
    cp.kubectl_run("create", "namespace", ns, check=True)
    # The chart's identity for watching this one namespace (release = this namespace).
    rendered = subprocess.run(
        [
            helm(),
            "template",
            "op",
            str(CHART),
            "--namespace",
            ns,
            "--set",
            f"watchNamespaces={{{ns}}}",
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["name"] = f"op-{ns}"  # one cluster-wide pair per test
            if doc["kind"] == "ClusterRoleBinding":
                doc["roleRef"]["name"] = f"op-{ns}"
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "op-pgscale")  # not the Lease's
    assert role["rules"] == [r.as_policy_rule() for r in rbac.NAMESPACED]
    if mutate is not None:
        role["rules"] = mutate(role["rules"])
    cp.kubectl_run("apply", "-f", "-", input=yaml.safe_dump_all(docs), check=True)
    user = f"system:serviceaccount:{ns}:op-pgscale"
    if denied:
        assert not can_i(cp, user, *denied, "-n", ns)
    kubeconfig = cp.service_account_kubeconfig(ns, "op-pgscale", tmp_path / "kubeconfig")

    cp.kubectl_run(
        "create", "secret", "generic", "app-db", "-n", ns, f"--from-literal=uri={postgres.uri(database)}", check=True
    )
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {
            "connection": {"secretRef": {"name": "app-db"}},
            "pooling": {"poolMode": "transaction", "defaultPoolSize": 2},
        },
    }
    cp.kubectl_run("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(profile), check=True)

    op = localenv.OperatorProcess(tmp_path, kubeconfig)
    try:
        op.start("--namespace", ns)
        if case == "as-rendered":
            cp.kubectl_run("wait", "-n", ns, "--for=condition=Ready", "dbp/app", "--timeout=60s", check=True)
            cp.kubectl_run("get", "-n", ns, "deployment/app-pooler-rw", "secret/app-pooler-rw-config", check=True)
            assert "Forbidden" not in op.log.read_text()
        elif case == "no-status-patch":
            # Logged as the API server's JSON body (quotes escaped) when the status write itself fails.
            wait_until(lambda: answer.replace('"', '\\"') in op.log.read_text(), what=answer, log=op.log)
            assert not get(cp, ns).get("status"), "nothing can be reported without the status subresource"
        else:
            stalled = wait_until(lambda: condition(get(cp, ns), "Stalled"), what="Stalled", log=op.log)
            assert stalled["status"] == "True" and answer in stalled["message"], stalled
            # The API server's own sentence and where to fix it, not the HTTP exchange.
            assert stalled["reason"] == "Forbidden" and "HTTP response" not in stalled["message"], stalled
            assert "docs/operations.md" in stalled["message"]
            assert condition(get(cp, ns), "Ready")["status"] == "False"
            assert cp.kubectl_run("get", "-n", ns, "secret/app-pooler-rw-config").returncode != 0
    finally:
        op.stop()
        cp.kubectl_run("delete", "namespace", ns, "--wait=false")
        cp.kubectl_run("delete", "clusterrole,clusterrolebinding", f"op-{ns}")


def get(cp: localenv.ControlPlane, ns: str) -> dict[str, Any]:
    return dict(json.loads(cp.kubectl_run("get", "-n", ns, "dbp/app", "-o", "json", check=True).stdout))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else {}
