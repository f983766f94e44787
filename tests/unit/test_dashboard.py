"""The Grafana dashboard queries only what pgscale exports, with the labels it exports, and is well formed.

Exported names and labels come from the code itself: the operator's registry
(metrics.Metrics) and the profile collector (monitoring.ProfileCollector), fed one
sample each so every family shows its labels, then named the way Prometheus
exposes them (counters with _total, histograms with _bucket/_sum/_count).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pgscale.metrics import Metrics
from pgscale.monitoring import SECONDS_PER_MONTH, ProfileCollector
from pgscale.pg.export import Totals
from pgscale.pg.stats import Snapshot, TableStats
from pgscale.relay import RelayMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "pgscale" / "dashboards" / "pgscale.json"
# Labels Prometheus adds to every scraped series (target labels), and the ones ALERTS carries.
SCRAPE_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
NOT_PGSCALE = {"ALERTS": {"alertname", "alertstate", "profile", "severity", "namespace", "replica"}}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for everything the operator's /metrics endpoint serves."""
    metrics = Metrics()
    metrics.reconcile_total.labels(kind="DatabaseProfile", outcome="success").inc()
    metrics.reconcile_seconds.labels(kind="DatabaseProfile").observe(0.1)
    metrics.queue_depth.set(0)
    metrics.resources.labels(kind="DatabaseProfile").set(1)
    metrics.export("ns/export", Totals(1, 2, 3, 4, None, datetime.now(UTC)))
    metrics.split("ns/split", lag_bytes=0, longest_block_ms=46, on_target=True, ready=1)
    collector = ProfileCollector()
    collector.update(
        "ns/app",
        Snapshot(
            connections={"active": 1},
            max_connections=100,
            database_bytes=1,
            tables=[TableStats("public.t", 1, 1, 1, 1, 1)],
            unused_indexes=["i"],
            statements_mean_seconds=0.1,
            replication={"app-replica-0": (1, 0.1)},
        ),
        1,
    )
    metrics.registry.register(collector)
    relay = RelayMetrics()  # a Cache's relay pod serves these (relay.py)
    relay.invalidations.labels("ns/c").inc()
    relay.keys_deleted.labels("ns/c").inc()
    relay.lag.labels("ns/c").observe(0.01)
    relay.depth.labels("ns/c").set(0)
    relay.oldest.labels("ns/c").set(0)
    relay.errors.labels("ns/c").inc()
    relay.info.labels("ns/c", "used_memory").set(1)
    relay.memory_limit.labels("ns/c").set(1)
    series: dict[str, set[str]] = {}
    for family in [*metrics.registry.collect(), *relay.registry.collect()]:
        assert family.samples, f"{family.name}: no sample, so its labels are unknown to this test"
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                series.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return series


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def expressions(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, and the series of label_values() variables."""
    exprs = [t["expr"] for p in all_panels(dash) for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
            assert m, v["definition"]
            exprs.append(f"max by ({m.group(2)}) ({m.group(1)})")  # the same check covers the label
    return exprs


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its braces) for every metric name in a PromQL expression."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values cannot be mistaken for names
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "0", expr)  # Grafana variables
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    out = []
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{([^}]*)\})?(\s*\()?", expr):
        name, body, call = m.group(1), m.group(3), m.group(4)
        if call or name in KEYWORDS:
            continue  # a function, or an operator word
        labels = {part.split("=")[0].strip(" !~") for part in body.split(",") if part.strip()} if body else set()
        out.append((name, labels))
    return out


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


def problems(expr: str, series: dict[str, set[str]]) -> list[str]:
    """What in one expression pgscale does not export: metric names, selector labels, grouping labels."""
    found = selectors(expr)
    if not found:
        return [f"no metric in {expr!r}"]
    out, known = [], set(SCRAPE_LABELS)
    for name, labels in found:
        if name in NOT_PGSCALE:
            exported_labels = NOT_PGSCALE[name]
        elif name.startswith("pgscale_") and name in series:
            exported_labels = series[name] | SCRAPE_LABELS
        else:
            out.append(f"{name} is not exported by pgscale")
            continue
        known |= exported_labels
        out += [f"{name} has no label {label}" for label in sorted(labels - exported_labels)]
    out += [f"no series has the label {label}" for label in sorted(grouping_labels(expr) - {"le"} - known)]
    return out


def test_every_metric_in_a_query_is_exported_with_those_labels() -> None:
    series = exported()
    used = set()
    for expr in expressions(dashboard()):
        assert problems(expr, series) == [], expr
        used |= {name for name, _ in selectors(expr)}
    # Every family pgscale exports has a panel.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in series}
    assert families <= {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}, families - used


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('max by (profile) (pgscale_pg_database_size{profile="a"})', "pgscale_pg_database_size is not exported"),
        ("sum(rate(pgscale_reconcile[5m]))", "pgscale_reconcile is not exported by pgscale"),
        ("sum(rate(pgscale_pg_table_seq_scans[5m]))", "pgscale_pg_table_seq_scans is not exported by pgscale"),
        ('max(pgscale_pg_database_size_bytes{database="a"})', "pgscale_pg_database_size_bytes has no label database"),
        ("max by (table) (pgscale_pg_database_size_bytes)", "no series has the label table"),
        ("max(up)", "up is not exported by pgscale"),
    ],
)
def test_mistakes_are_caught(expr: str, problem: str) -> None:
    assert any(p.startswith(problem) for p in problems(expr, exported())), problems(expr, exported())


def test_selector_parser() -> None:
    expr = 'max by (profile) (deriv(pgscale_pg_database_size_bytes{profile=~"$ns/.*"}[1d])) * 2630016'
    assert selectors(expr) == [("pgscale_pg_database_size_bytes", {"profile"})]
    assert grouping_labels(expr) == {"profile"}
    assert selectors('sum(ALERTS{alertname=~"Pgscale.*", alertstate="firing"})') == [
        ("ALERTS", {"alertname", "alertstate"})
    ]


def test_growth_uses_the_operators_month() -> None:
    growth = [e for e in expressions(dashboard()) if "deriv(" in e]
    assert growth and all(f"* {SECONDS_PER_MONTH:.0f}" in e for e in growth)


def test_well_formed_dashboard() -> None:
    dash = dashboard()
    assert dash["uid"] == "pgscale" and dash["title"] == "pgscale" and dash["schemaVersion"] >= 36
    assert "id" not in dash or dash["id"] is None  # Grafana assigns ids; a fixed one clashes on import
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "profile"} <= set(variables)
    assert "$namespace" in variables["profile"]["definition"]
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in all_panels(dash):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        boxes.append((grid["x"], grid["y"], grid["w"], grid["h"], panel["title"]))
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows and where it comes from"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"] and t["expr"].strip()
            for var in re.findall(r"\$\{?(\w+)", t["expr"]):
                assert var in variables or var in BUILTIN_VARIABLES, f"{panel['title']}: ${var} undefined"
    for i, (x, y, w, h, title) in enumerate(boxes):
        for x2, y2, w2, h2, title2 in boxes[i + 1 :]:
            overlap = x < x2 + w2 and x2 < x + w and y < y2 + h2 and y2 < y + h
            assert not overlap, f"panels {title!r} and {title2!r} overlap"


@pytest.mark.parametrize("name", ["pgscale_reconcile_total", "pgscale_pg_table_seq_scans_total"])
def test_counters_are_exported_with_total(name: str) -> None:
    assert name in exported()
