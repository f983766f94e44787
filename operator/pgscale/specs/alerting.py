"""prometheus-operator objects for pgscale: a profile's alert thresholds and a PodMonitor.

The PrometheusRule evaluates the metrics the
operator exports (monitoring.ProfileCollector), filtered to one profile's label value
(`profile="<namespace>/<name>"`). Expressions aggregate with `max by (profile)` so an
alert keeps its identity when the operator's pod (and so the scraped `pod`/`instance`
labels) changes.

There is no memory-commitment rule: the operator exports neither the settings' memory
estimate nor the primary's memory, so `memoryPercent` is evaluated by the controller
only (status.alerts and Events).
"""

from __future__ import annotations

import math
from typing import Any

from ..api.databaseprofile import AlertsSpec
from ..kube import ObjectRef
from ..metrics import PREFIX
from ..monitoring import SECONDS_PER_MONTH
from ..quantity import parse_quantity
from .builders import object_meta

API_VERSION = "monitoring.coreos.com/v1"
RULE_COMPONENT = "alerting"
MAX_NAME = 253  # a DNS subdomain: the longest object name

# Alert name -> severity label.
SEVERITIES: dict[str, str] = {
    "PgscaleConnectionUtilization": "warning",
    "PgscaleSlowQueries": "warning",
    "PgscaleDatabaseGrowth": "info",
    "PgscaleReplicationLag": "warning",
    "PgscalePendingRestart": "info",
}

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def promql_string(value: str) -> str:
    """A double-quoted PromQL string literal holding value (Go escapes, as PromQL's lexer reads them)."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def promql_number(value: float) -> str:
    """A PromQL number literal that parses back to exactly value (shortest round-trip repr)."""
    if isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number, got {value!r}")
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def profile_label(owner: ObjectRef) -> str:
    """The `profile` label value the operator exports for a DatabaseProfile."""
    return f"{owner.namespace}/{owner.name}"


def rule_name(owner: ObjectRef) -> str:
    """`<profile>-pgscale`; names too long for that are shortened and made unique by the uid."""
    name = f"{owner.name}-pgscale"
    if len(name) <= MAX_NAME:
        return name
    uid = owner.uid.replace("-", "")[:8]
    return f"{owner.name[: MAX_NAME - len(uid) - 9].rstrip('-.')}-{uid}-pgscale"


def _alert(name: str, expr: str, for_: str, owner: ObjectRef, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": SEVERITIES[name], "namespace": owner.namespace},
        "annotations": {"summary": summary, "description": description},
    }


def alert_rules(owner: ObjectRef, alerts: AlertsSpec) -> list[dict[str, Any]]:
    """The alerting rules of one profile, with the spec's thresholds."""
    profile = profile_label(owner)
    sel = "{profile=" + promql_string(profile) + "}"
    m = f"{PREFIX}_pg"
    ratio = alerts.connection_utilization_percent / 100
    growth = parse_quantity(alerts.growth_per_month)
    lag = alerts.replication_lag_seconds
    qt = alerts.query_time_seconds
    return [
        _alert(
            "PgscaleConnectionUtilization",
            f"max by (profile) ({m}_connection_utilization_ratio{sel}) > {promql_number(ratio)}",
            "5m",
            owner,
            f"Postgres of {profile} uses over {alerts.connection_utilization_percent}% of max_connections",
            f"DatabaseProfile {profile}: {{{{ $value | humanizePercentage }}}} of max_connections in use, "
            f"threshold {alerts.connection_utilization_percent}%.",
        ),
        _alert(
            "PgscaleSlowQueries",
            f"max by (profile) ({m}_statement_mean_seconds{sel}) > {promql_number(qt)}",
            "10m",
            owner,
            f"Mean statement time of {profile} is over {promql_number(qt)}s",
            f"DatabaseProfile {profile}: mean statement time (pg_stat_statements) is "
            f"{{{{ $value | humanizeDuration }}}}, threshold {promql_number(qt)}s.",
        ),
        _alert(
            "PgscaleDatabaseGrowth",
            f"max by (profile) (deriv({m}_database_size_bytes{sel}[1d])) * {promql_number(SECONDS_PER_MONTH)}"
            f" > {promql_number(growth)}",
            "1h",
            owner,
            f"Database of {profile} grows faster than {alerts.growth_per_month} per month",
            f"DatabaseProfile {profile}: growing {{{{ $value | humanize1024 }}}}B per month over the last day, "
            f"threshold {alerts.growth_per_month} ({growth} bytes) per month.",
        ),
        _alert(
            "PgscaleReplicationLag",
            f"max by (profile, replica) ({m}_replication_lag_seconds{sel}) > {promql_number(lag)}",
            "5m",
            owner,
            f"A read replica of {profile} lags more than {lag}s",
            f"DatabaseProfile {profile}: replica {{{{ $labels.replica }}}} is "
            f"{{{{ $value | humanizeDuration }}}} behind the primary, threshold {lag}s.",
        ),
        _alert(
            "PgscalePendingRestart",
            f"max by (profile) ({m}_settings_pending_restart{sel}) > 0",
            "1h",
            owner,
            f"Postgres of {profile} needs a restart for managed settings",
            f"DatabaseProfile {profile}: {{{{ $value }}}} managed settings take effect only after a restart "
            "(see status.pendingRestart), threshold 0.",
        ),
    ]


def prometheus_rule(owner: ObjectRef, alerts: AlertsSpec, extra_labels: dict[str, str]) -> dict[str, Any]:
    """A PrometheusRule with the profile's alerts, owned by the profile.

    extra_labels (e.g. the `release` label a Prometheus selects rules by) cannot
    override pgscale's own labels.
    """
    meta = object_meta(owner, rule_name(owner), RULE_COMPONENT)
    meta["labels"] = {**extra_labels, **meta["labels"]}
    return {
        "apiVersion": API_VERSION,
        "kind": "PrometheusRule",
        "metadata": meta,
        "spec": {"groups": [{"name": f"pgscale.{owner.namespace}.{owner.name}", "rules": alert_rules(owner, alerts)}]},
    }
