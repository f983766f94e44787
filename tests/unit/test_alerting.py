"""PrometheusRule and PodMonitor builders: structure, labels, thresholds, escaping."""

from __future__ import annotations

import re
from typing import Any

import pytest

from pgscale.api.databaseprofile import AlertsSpec
from pgscale.kube import ObjectRef
from pgscale.specs import alerting

OWNER = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "shop", "app", "1234-5678-90ab")
NAMES = [
    "PgscaleConnectionUtilization",
    "PgscaleSlowQueries",
    "PgscaleDatabaseGrowth",
    "PgscaleReplicationLag",
    "PgscalePendingRestart",
]
# Go duration syntax the PrometheusRule CRD accepts for `for`.
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def rules(alerts: AlertsSpec | None = None, owner: ObjectRef = OWNER) -> dict[str, dict[str, Any]]:
    obj = alerting.prometheus_rule(owner, alerts or AlertsSpec(), {})
    return {r["alert"]: r for r in obj["spec"]["groups"][0]["rules"]}


def test_rule_structure_and_ownership() -> None:
    obj = alerting.prometheus_rule(OWNER, AlertsSpec(), {})
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PrometheusRule"
    meta = obj["metadata"]
    assert meta["name"] == "app-pgscale" and meta["namespace"] == "shop"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": OWNER.api_version,
            "kind": "DatabaseProfile",
            "name": "app",
            "uid": OWNER.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert [g["name"] for g in obj["spec"]["groups"]] == ["pgscale.shop.app"]
    by_name = rules()
    assert list(by_name) == NAMES  # no memory rule: its inputs are not exported
    for rule in by_name.values():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
        assert DURATION.match(rule["for"])
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["labels"]["namespace"] == "shop"
        assert set(rule["annotations"]) == {"summary", "description"}
        assert "shop/app" in rule["annotations"]["summary"]
        assert "shop/app" in rule["annotations"]["description"]
    assert {n: r["for"] for n, r in by_name.items()} == {
        "PgscaleConnectionUtilization": "5m",
        "PgscaleSlowQueries": "10m",
        "PgscaleDatabaseGrowth": "1h",
        "PgscaleReplicationLag": "5m",
        "PgscalePendingRestart": "1h",
    }


def test_labels_extra_cannot_override_pgscale_labels() -> None:
    extra = {"release": "kube-prometheus-stack", "app.kubernetes.io/managed-by": "someone-else"}
    meta = alerting.prometheus_rule(OWNER, AlertsSpec(), extra)["metadata"]
    assert meta["labels"] == {
        "release": "kube-prometheus-stack",
        "app.kubernetes.io/managed-by": "pgscale",
        "app.kubernetes.io/component": "alerting",
        "pgscale.io/databaseprofile": "app",
    }
    assert extra["app.kubernetes.io/managed-by"] == "someone-else"  # input not mutated


def test_default_thresholds() -> None:
    r = rules()
    assert r["PgscaleConnectionUtilization"]["expr"] == (
        'max by (profile) (pgscale_pg_connection_utilization_ratio{profile="shop/app"}) > 0.8'
    )
    assert r["PgscaleSlowQueries"]["expr"] == (
        'max by (profile) (pgscale_pg_statement_mean_seconds{profile="shop/app"}) > 1'
    )
    assert r["PgscaleDatabaseGrowth"]["expr"] == (
        'max by (profile) (deriv(pgscale_pg_database_size_bytes{profile="shop/app"}[1d])) * 2630016 > 10737418240'
    )
    assert r["PgscaleReplicationLag"]["expr"] == (
        'max by (profile, replica) (pgscale_pg_replication_lag_seconds{profile="shop/app"}) > 60'
    )
    assert r["PgscalePendingRestart"]["expr"] == (
        'max by (profile) (pgscale_pg_settings_pending_restart{profile="shop/app"}) > 0'
    )
    assert "80%" in r["PgscaleConnectionUtilization"]["annotations"]["description"]
    assert "10Gi" in r["PgscaleDatabaseGrowth"]["annotations"]["summary"]
    assert "60s" in r["PgscaleReplicationLag"]["annotations"]["description"]


def test_custom_thresholds() -> None:
    spec = AlertsSpec.model_validate(
        {
            "connectionUtilizationPercent": 57,
            "queryTimeSeconds": 0.25,
            "growthPerMonth": "1.5Gi",
            "replicationLagSeconds": 5,
        }
    )
    r = rules(spec)
    assert r["PgscaleConnectionUtilization"]["expr"].endswith(" > 0.57")
    assert r["PgscaleSlowQueries"]["expr"].endswith(" > 0.25")
    assert r["PgscaleDatabaseGrowth"]["expr"].endswith(f" > {int(1.5 * 2**30)}")
    assert r["PgscaleReplicationLag"]["expr"].endswith(" > 5")
    assert "57%" in r["PgscaleConnectionUtilization"]["annotations"]["summary"]
    assert "0.25s" in r["PgscaleSlowQueries"]["annotations"]["summary"]
    assert "1.5Gi" in r["PgscaleDatabaseGrowth"]["annotations"]["summary"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (80, "80"),
        (0.8, "0.8"),
        (1.0, "1"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1e-05, "1e-05"),
        (2630016.0, "2630016"),
        (1e16, "1e+16"),
        (10 * 2**30, "10737418240"),
    ],
)
def test_numbers_round_trip(value: float, text: str) -> None:
    assert alerting.promql_number(value) == text
    assert float(text) == value


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), True])
def test_non_finite_numbers_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        alerting.promql_number(value)


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("shop/app", '"shop/app"'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("a\nb\tc\r", '"a\\nb\\tc\\r"'),
        ("\x00\x7f", '"\\x00\\x7f"'),
        ("ünï", '"ünï"'),
    ],
)
def test_promql_string_escaping(value: str, literal: str) -> None:
    assert alerting.promql_string(value) == literal


def test_profile_value_is_escaped_in_every_expression() -> None:
    owner = ObjectRef(OWNER.api_version, OWNER.kind, 'n"s', "x\\y", OWNER.uid)
    for rule in rules(owner=owner).values():
        assert '{profile="n\\"s/x\\\\y"}' in rule["expr"]


def test_every_rule_filters_on_the_profile() -> None:
    for rule in rules().values():
        selectors = re.findall(r"\{[^}]*\}", rule["expr"])
        assert selectors == ['{profile="shop/app"}']


def test_long_profile_names_fit_a_dns_subdomain() -> None:
    owner = ObjectRef(OWNER.api_version, OWNER.kind, "shop", "a" * 253, "abcdef12-3456")
    name = alerting.rule_name(owner)
    assert len(name) <= 253 and name.endswith("-abcdef12-pgscale")
    assert alerting.rule_name(ObjectRef("v", "K", "ns", "a" * 245, "u")) == "a" * 245 + "-pgscale"
