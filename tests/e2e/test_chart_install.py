"""The chart's output against a real kube-apiserver: validated, installed by Helm, uninstalled.

- Every rendering (default values, everything on, watch-namespaces mode, PodMonitor) is applied
  with `--dry-run=server` (strict field validation, CRD schemas of prometheus-operator's kinds,
  admission), in a namespace enforcing the `restricted` Pod Security Standard, and must pass
  without a warning.
- `helm install` (the binary built from hack/helm) into a cluster of the test's own, so the CRDs
  are the chart's: objects exist; `helm uninstall` removes them but keeps the CRDs (and the
  resources of their kinds). `kubectl apply -k manifests/` installs the same objects.

No kubelet runs, so the operator's pod never starts; that it works with these permissions is
shown by the e2e suite (the `operator` fixture runs as this chart's ServiceAccount).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localenv
import pytest
import yaml

from conftest import ROOT, helm_binary
from pgscale import api

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "pgscale"
MONITORING_CRDS = ("prometheusrules", "podmonitors", "servicemonitors")
PGSCALE_CRDS = tuple(kind.plural for kind in api.KINDS)


def ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, f"{what} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def template(namespace: str, *args: str, release: str = "pgscale") -> str:
    result = subprocess.run(
        [helm_binary(), "template", release, str(CHART), "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return ok(result, "helm template")


def new_namespace(cp: localenv.ControlPlane, restricted: bool = True) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    ok(cp.kubectl_run("create", "namespace", name), "create namespace")
    if restricted:  # the operator's pod must satisfy the strictest Pod Security Standard
        ok(
            cp.kubectl_run(
                "label",
                "namespace",
                name,
                "pod-security.kubernetes.io/enforce=restricted",
                "pod-security.kubernetes.io/warn=restricted",
            ),
            "label namespace",
        )
    return name


@pytest.fixture(scope="module")
def monitoring_crds(control_plane: localenv.ControlPlane) -> None:
    """prometheus-operator's PrometheusRule, PodMonitor and ServiceMonitor CRDs (hack/promop), Established."""
    script = ROOT / "hack" / "promop" / "crds.sh"
    out = ok(subprocess.run([str(script)], capture_output=True, text=True, timeout=600), str(script))
    crd_dir = Path(out.splitlines()[0]).parent  # the module's example/prometheus-operator-crd
    for plural in MONITORING_CRDS:
        path = crd_dir / f"monitoring.coreos.com_{plural}.yaml"
        ok(control_plane.kubectl_run("apply", "--server-side", "-f", str(path)), f"apply {path.name}")
    ok(
        control_plane.kubectl_run(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            *(f"crd/{p}.monitoring.coreos.com" for p in MONITORING_CRDS),
        ),
        "wait",
    )


VARIANTS: dict[str, list[str]] = {
    "default": [],
    "everything": ["--values", str(CHART / "ci" / "everything-values.yaml")],
    "podmonitor": ["--set", "metrics.monitor.enabled=true", "--set", "metrics.monitor.kind=PodMonitor",
                   "--set", "prometheusRule.enabled=true", "--set", "crds.install=false"],
    "watch-namespaces": [],  # filled in with two fresh namespaces
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rendering_passes_server_side_validation(
    control_plane: localenv.ControlPlane, monitoring_crds: None, variant: str
) -> None:
    namespace = new_namespace(control_plane)
    args = list(VARIANTS[variant])
    if variant == "watch-namespaces":
        watched = [new_namespace(control_plane, restricted=False) for _ in range(2)]
        args = ["--set", "watchNamespaces={" + ",".join(watched) + "}"]
    rendered = template(namespace, *args)
    kinds = sorted({d["kind"] for d in yaml.safe_load_all(rendered) if d})
    result = control_plane.kubectl_run(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "--field-manager=chart-test",
        "-f",
        "-",
        input=rendered,
    )
    ok(result, f"server dry-run of the {variant} rendering")
    assert "Warning" not in result.stderr, result.stderr  # e.g. would violate PodSecurity "restricted"
    assert result.stdout.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d])
    expected = {
        "default": {
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
        },
        "everything": {"ServiceMonitor", "PrometheusRule", "ConfigMap", "CustomResourceDefinition"},
        "podmonitor": {"PodMonitor", "PrometheusRule"},
        "watch-namespaces": {"Role", "RoleBinding", "ClusterRole"},
    }[variant]
    assert expected <= set(kinds), kinds
    control_plane.kubectl_run("delete", "namespace", namespace, "--wait=false")


def test_server_rejects_what_the_schema_lets_through(control_plane: localenv.ControlPlane) -> None:
    """The dry run is a real check: a label value Kubernetes refuses fails it."""
    namespace = new_namespace(control_plane)
    rendered = template(namespace, "--set", "crds.install=false", "--set-string", "podLabels.team=not a label!")
    result = control_plane.kubectl_run("apply", "--server-side", "--dry-run=server", "-f", "-", input=rendered)
    assert result.returncode != 0 and "Invalid value" in result.stderr, result.stderr


@pytest.fixture(scope="module")
def fresh_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localenv.ControlPlane]:
    """A control plane of this module's own: no pgscale CRDs until the chart installs them."""
    cp = localenv.ControlPlane(tmp_path_factory.mktemp("chart-cluster"))
    try:
        yield cp.start()
    finally:
        cp.stop()


def names(cp: localenv.ControlPlane, kind: str, namespace: str | None = None) -> set[str]:
    scope = ["-n", namespace] if namespace else []
    out = ok(cp.kubectl_run("get", kind, *scope, "-o", "json"), f"get {kind}")
    return {item["metadata"]["name"] for item in json.loads(out)["items"]}


def test_helm_install_then_uninstall_keeps_crds(fresh_cluster: localenv.ControlPlane) -> None:
    cp = fresh_cluster
    namespace = new_namespace(cp)
    crds = {f"{p}.pgscale.io" for p in PGSCALE_CRDS}
    assert not crds & names(cp, "crd")
    base = [helm_binary(), "--kubeconfig", str(cp.kubeconfig), "--namespace", namespace]
    ok(
        subprocess.run([*base, "install", "pgscale", str(CHART)], capture_output=True, text=True, timeout=300),
        "helm install",
    )
    ok(cp.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{c}" for c in crds)), "wait")
    assert crds <= names(cp, "crd")
    assert "pgscale" in names(cp, "deployment", namespace)
    assert "pgscale" in names(cp, "serviceaccount", namespace)
    assert "pgscale-metrics" in names(cp, "service", namespace)
    assert {"pgscale", "pgscale-view", "pgscale-edit"} <= names(cp, "clusterrole")
    assert "pgscale" in names(cp, "clusterrolebinding")
    # The aggregated view role now includes the pgscale kinds.
    can = cp.kubectl_run(
        "auth", "can-i", "list", "databaseprofiles.pgscale.io", "-n", namespace, "--as=someone", "--as-group=viewers"
    )
    assert can.stdout.strip() == "no"
    ok(
        cp.kubectl_run("create", "rolebinding", "viewers", "-n", namespace, "--clusterrole=view", "--group=viewers"),
        "bind view",
    )
    can = cp.kubectl_run(
        "auth", "can-i", "list", "databaseprofiles.pgscale.io", "-n", namespace, "--as=someone", "--as-group=viewers"
    )
    assert can.stdout.strip() == "yes", can.stderr
    # A resource of the user's, to survive the uninstall.
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {"connection": {"secretRef": {"name": "app-db"}}},
    }
    ok(cp.kubectl_run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(profile)), "apply profile")

    ok(subprocess.run([*base, "uninstall", "pgscale"], capture_output=True, text=True, timeout=300), "helm uninstall")
    assert "pgscale" not in names(cp, "deployment", namespace)
    assert "pgscale" not in names(cp, "serviceaccount", namespace)
    assert not {"pgscale", "pgscale-view", "pgscale-edit"} & names(cp, "clusterrole")
    assert crds <= names(cp, "crd"), "helm uninstall must keep the CRDs (helm.sh/resource-policy: keep)"
    assert names(cp, "databaseprofiles.pgscale.io", namespace) == {"app"}


def test_kubectl_apply_k_manifests(fresh_cluster: localenv.ControlPlane) -> None:
    """`kubectl apply -k manifests/` installs the chart's default objects (the CRDs may exist already)."""
    cp = fresh_cluster
    built = [d for d in yaml.safe_load_all(ok(cp.kubectl_run("kustomize", str(ROOT / "manifests")), "kustomize")) if d]
    ok(cp.kubectl_run("apply", "-k", str(ROOT / "manifests")), "kubectl apply -k")  # as docs/operations.md says
    ns = "pgscale-system"
    expected: dict[str, Any] = {
        "deployment": ({"pgscale"}, ns),
        "serviceaccount": ({"pgscale"}, ns),
        "service": ({"pgscale-metrics"}, ns),
        "clusterrole": ({"pgscale", "pgscale-view", "pgscale-edit"}, None),
        "clusterrolebinding": ({"pgscale"}, None),
        "crd": ({f"{p}.pgscale.io" for p in PGSCALE_CRDS}, None),
        "role": ({"pgscale-leader-election"}, ns),
        "rolebinding": ({"pgscale-leader-election"}, ns),
        "poddisruptionbudget": ({"pgscale"}, ns),
    }
    for kind, (wanted, namespace) in expected.items():
        assert wanted <= names(cp, kind, namespace), kind
    assert sorted(d["kind"] for d in built) == sorted(
        ["CustomResourceDefinition"] * len(PGSCALE_CRDS)
        + [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "Role",
            "RoleBinding",
            "PodDisruptionBudget",
        ]
    )
    deployment = json.loads(ok(cp.kubectl_run("get", "deployment", "pgscale", "-n", ns, "-o", "json"), "get"))
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "pgscale"
