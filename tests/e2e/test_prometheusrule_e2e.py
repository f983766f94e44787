"""The rendered PrometheusRule and PodMonitor pass prometheus-operator's real CRD schemas.

The CRDs come from the prometheus-operator module pinned in hack/promop/go.mod
(hack/promop/crds.sh downloads it through the Go module proxy into the Go module
cache). They are installed into the local kube-apiserver once per session; each
object is applied with `--dry-run=server`, then for real, and read back unchanged
(kubectl's strict field validation rejects unknown fields, so nothing was pruned).
Broken variants are rejected, which shows the schema is enforced. No
prometheus-operator runs here: PromQL syntax is not checked (that is its webhook's job).
"""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import localenv
import pytest
import yaml

from conftest import ROOT, Kubectl
from pgscale.api.databaseprofile import AlertsSpec
from pgscale.kube import ObjectRef
from pgscale.specs import alerting

pytestmark = pytest.mark.cluster

CRDS_SCRIPT = ROOT / "hack" / "promop" / "crds.sh"
CRDS = ("prometheusrules.monitoring.coreos.com", "podmonitors.monitoring.coreos.com")


def _ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, f"{what} failed ({result.returncode}): {result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def prometheus_operator_crds(control_plane: localenv.ControlPlane) -> list[Path]:
    """prometheus-operator's PrometheusRule and PodMonitor CRDs, installed and Established."""
    out = _ok(subprocess.run([str(CRDS_SCRIPT)], capture_output=True, text=True, timeout=600), str(CRDS_SCRIPT))
    paths = [Path(line) for line in out.splitlines() if line.strip()]
    assert [p.name for p in paths] == [f"monitoring.coreos.com_{crd.split('.')[0]}.yaml" for crd in CRDS]
    for path in paths:
        _ok(control_plane.kubectl_run("apply", "--server-side", "-f", str(path)), f"kubectl apply {path}")
    _ok(
        control_plane.kubectl_run("wait", "--for=condition=Established", *(f"crd/{c}" for c in CRDS), "--timeout=60s"),
        "kubectl wait for the CRDs",
    )
    return paths


@pytest.fixture
def profile(kubectl: Kubectl, prometheus_operator_crds: list[Path]) -> ObjectRef:
    """A real DatabaseProfile (no operator runs), so the rule's owner reference stays valid."""
    kubectl.apply(
        {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": "DatabaseProfile",
            "metadata": {"name": "app"},
            "spec": {"connection": {"secretRef": {"name": "app-db"}}, "tier": "production"},
        }
    )
    return ObjectRef.of(kubectl.get("databaseprofile", "app"))


def _apply(kubectl: Kubectl, obj: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = kubectl.apply(obj, *extra, check=False)
    return result


def _accepted(kubectl: Kubectl, obj: dict[str, Any], resource: str) -> dict[str, Any]:
    """Server-side dry run (nothing stored), then a real apply; the stored object."""
    name = obj["metadata"]["name"]
    _ok(_apply(kubectl, obj, "--dry-run=server"), f"dry-run apply of {resource}/{name}")
    assert _absent(kubectl, resource, name), f"the dry run stored {resource}/{name}"
    _ok(_apply(kubectl, obj), f"apply of {resource}/{name}")
    stored = kubectl.get(resource, name)
    assert stored["spec"] == obj["spec"]  # nothing pruned, nothing defaulted away
    assert stored["metadata"]["labels"] == obj["metadata"]["labels"]
    return stored


def test_rendered_prometheus_rule_is_accepted_and_owned(kubectl: Kubectl, profile: ObjectRef) -> None:
    alerts = AlertsSpec.model_validate(
        {
            "connectionUtilizationPercent": 57,
            "queryTimeSeconds": 0.25,
            "growthPerMonth": "1.5Gi",
            "prometheusRule": {"enabled": True},
        }
    )
    rule = alerting.prometheus_rule(profile, alerts, {"release": "kube-prometheus-stack"})
    stored = _accepted(kubectl, rule, "prometheusrule")
    assert stored["metadata"]["ownerReferences"][0]["uid"] == profile.uid
    alerts_stored = [r["alert"] for r in stored["spec"]["groups"][0]["rules"]]
    assert alerts_stored == list(alerting.SEVERITIES)
    # The controller-manager's garbage collector deletes the rule with its profile.
    kubectl.run("delete", "databaseprofile", "app", "--wait=false")
    _eventually(lambda: _absent(kubectl, "prometheusrule", rule["metadata"]["name"]))


def _rule_without_expr(obj: dict[str, Any]) -> None:
    del obj["spec"]["groups"][0]["rules"][0]["expr"]


def _rule_with_bad_for(obj: dict[str, Any]) -> None:
    obj["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"


def _rule_with_unknown_field(obj: dict[str, Any]) -> None:
    rule = obj["spec"]["groups"][0]["rules"][0]
    rule["expression"] = rule.pop("expr")


def _group_without_name(obj: dict[str, Any]) -> None:
    del obj["spec"]["groups"][0]["name"]


# (id, kind, change, text the error must contain)
INVALID: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    ("rule-without-expr", "PrometheusRule", _rule_without_expr, "spec.groups[0].rules[0].expr: Required value"),
    ("rule-bad-for", "PrometheusRule", _rule_with_bad_for, "spec.groups[0].rules[0].for"),
    ("rule-unknown-field", "PrometheusRule", _rule_with_unknown_field, 'unknown field "spec.groups[0].rules[0]'),
    ("group-without-name", "PrometheusRule", _group_without_name, "spec.groups[0].name: Required value"),
]


@pytest.mark.parametrize(("kind", "change", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_schema_rejects_broken_objects(
    kubectl: Kubectl,
    prometheus_operator_crds: list[Path],
    kind: str,
    change: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", kubectl.namespace, "app", "0000-uid")
    valid = alerting.prometheus_rule(owner, AlertsSpec(), {})
    _ok(_apply(kubectl, valid, "--dry-run=server"), f"dry-run apply of the valid {kind}")
    broken = copy.deepcopy(valid)
    change(broken)
    for extra in (("--dry-run=server",), ()):
        result = _apply(kubectl, broken, *extra)
        assert result.returncode != 0, f"{kind} was accepted: {yaml.safe_dump(broken)}"
        assert message in result.stderr, result.stderr
    assert _absent(kubectl, kind.lower(), valid["metadata"]["name"])


def _absent(kubectl: Kubectl, resource: str, name: str) -> bool:
    result = kubectl.cp.kubectl_run("-n", kubectl.namespace, "get", resource, name)
    return result.returncode != 0 and "NotFound" in result.stderr


def _eventually(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_profile_with_prometheus_rule_enabled(
    operator: Any, kubectl: Kubectl, prometheus_operator_crds: list[Path], app_secret: str
) -> None:
    """The operator renders the profile's thresholds into a PrometheusRule and removes it when disabled."""
    import json as _json
    import time as _time

    alerts = {"connectionUtilizationPercent": 70, "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}
    obj = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {"connection": {"secretRef": {"name": "app-db"}}, "monitoring": {"alerts": alerts}},
    }
    kubectl.apply(obj)
    kubectl.wait("databaseprofile", "app", "Ready")
    rule = kubectl.get("prometheusrule", "app-pgscale")
    assert rule["metadata"]["labels"]["release"] == "kps"
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("0.7" in e and "connection_utilization_ratio" in e for e in exprs)
    assert kubectl.get("databaseprofile", "app")["status"]["prometheusRule"] == "app-pgscale"
    kubectl.run(
        "patch",
        "dbp",
        "app",
        "--type=merge",
        "-p",
        _json.dumps({"spec": {"monitoring": {"alerts": {"prometheusRule": {"enabled": False}}}}}),
    )
    deadline = _time.monotonic() + 30
    while (
        "NotFound" not in kubectl.cp.kubectl_run("-n", kubectl.namespace, "get", "prometheusrule", "app-pgscale").stderr
    ):
        assert _time.monotonic() < deadline
        _time.sleep(0.5)


def test_cache_prometheus_rule_and_pod_monitor_are_accepted(
    kubectl: Kubectl, prometheus_operator_crds: list[Path]
) -> None:
    """A Cache's alerts and its relay's PodMonitor (specs/cache.py) pass the same schemas."""
    from pgscale.api.cache import CacheAlertsSpec
    from pgscale.specs import cache as cache_specs

    kubectl.apply(
        {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": "Cache",
            "metadata": {"name": "tasks"},
            "spec": {"profileRef": {"name": "app"}},
        }
    )
    owner = ObjectRef.of(kubectl.get("cache", "tasks"))
    alerts = CacheAlertsSpec.model_validate({"hitRatioPercent": 75, "prometheusRule": {"enabled": True}})
    rule = _accepted(kubectl, cache_specs.prometheus_rule(owner, alerts, {"release": "x"}), "prometheusrule")
    assert [r["alert"] for r in rule["spec"]["groups"][0]["rules"]] == list(cache_specs.RULE_SEVERITIES)
    monitor = _accepted(kubectl, cache_specs.pod_monitor(owner, {}), "podmonitor")
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics"}]
