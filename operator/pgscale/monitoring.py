"""What a DatabaseProfile's numbers mean: alerts, growth projections and Prometheus metrics.

Pure evaluation (alerts, growth) is separate from the collector, which renders the
latest snapshot of each profile on the operator's /metrics endpoint with bounded
labels (profile, connection state, the 20 largest tables, replica name).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .api.databaseprofile import AlertsSpec
from .metrics import PREFIX
from .pg.stats import Snapshot

SECONDS_PER_MONTH = 30.44 * 86400


@dataclass(frozen=True)
class Alert:
    name: str
    value: float
    threshold: float
    message: str


def growth_per_month(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of size over time, in bytes per month; None with under a day of samples."""
    if len(points) < 2 or points[-1][0] - points[0][0] < 86400:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    slope = sum((t - mean_t) * (b - mean_b) for t, b in points) / var
    return slope * SECONDS_PER_MONTH


def evaluate(
    spec: AlertsSpec,
    snap: Snapshot,
    *,
    growth_bytes_per_month: float | None,
    growth_threshold_bytes: int,
    memory_estimate: int | None,
    memory_bytes: int | None,
) -> list[Alert]:
    """The thresholds exceeded now (the strategy's defaults unless the spec overrides them)."""
    alerts = []
    used = sum(snap.connections.values())
    if snap.max_connections:
        pct = 100.0 * used / snap.max_connections
        if pct > spec.connection_utilization_percent:
            alerts.append(
                Alert(
                    "ConnectionUtilization",
                    round(pct, 1),
                    spec.connection_utilization_percent,
                    f"{used} of {snap.max_connections} connections in use ({pct:.0f}%)",
                )
            )
    if snap.statements_mean_seconds is not None and snap.statements_mean_seconds > spec.query_time_seconds:
        alerts.append(
            Alert(
                "QueryTime",
                round(snap.statements_mean_seconds, 3),
                spec.query_time_seconds,
                f"mean statement time {snap.statements_mean_seconds:.2f}s",
            )
        )
    if growth_bytes_per_month is not None and growth_bytes_per_month > growth_threshold_bytes:
        alerts.append(
            Alert(
                "DatabaseGrowth",
                round(growth_bytes_per_month),
                growth_threshold_bytes,
                f"growing {growth_bytes_per_month / 2**30:.1f} GiB per month",
            )
        )
    if memory_estimate and memory_bytes:
        pct = 100.0 * memory_estimate / memory_bytes
        if pct > spec.memory_percent:
            alerts.append(
                Alert(
                    "MemoryCommitment",
                    round(pct, 1),
                    spec.memory_percent,
                    f"settings can use {memory_estimate / 2**30:.1f} GiB of "
                    f"{memory_bytes / 2**30:.1f} GiB ({pct:.0f}%)",
                )
            )
    for replica, (_, lag_seconds) in snap.replication.items():
        if lag_seconds is not None and lag_seconds > spec.replication_lag_seconds:
            alerts.append(
                Alert(
                    "ReplicationLag",
                    round(lag_seconds, 1),
                    spec.replication_lag_seconds,
                    f"replica {replica} is {lag_seconds:.0f}s behind",
                )
            )
    return alerts


class ProfileCollector(Collector):
    """Renders the latest snapshot of every profile (replaced on each reconcile)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, tuple[Snapshot, int]] = {}  # profile -> (snapshot, pending restarts)

    def update(self, profile: str, snap: Snapshot, pending_restart: int) -> None:
        with self._lock:
            self._snapshots[profile] = (snap, pending_restart)

    def forget(self, profile: str) -> None:
        with self._lock:
            self._snapshots.pop(profile, None)

    def clear(self) -> None:
        """Leadership lost: the new leader exports the figures; stale copies here would mislead."""
        with self._lock:
            self._snapshots.clear()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            items = sorted(self._snapshots.items())
        p = f"{PREFIX}_pg"
        conns = GaugeMetricFamily(f"{p}_connections", "Client connections by state.", labels=["profile", "state"])
        maxc = GaugeMetricFamily(f"{p}_max_connections", "max_connections of the server.", labels=["profile"])
        util = GaugeMetricFamily(
            f"{p}_connection_utilization_ratio", "Connections in use / max_connections.", labels=["profile"]
        )
        dbsize = GaugeMetricFamily(f"{p}_database_size_bytes", "Size of the database.", labels=["profile"])
        tsize = GaugeMetricFamily(
            f"{p}_table_size_bytes", "Total size of the largest tables.", labels=["profile", "table"]
        )
        dead = GaugeMetricFamily(
            f"{p}_table_dead_tuples", "Dead tuples of the largest tables.", labels=["profile", "table"]
        )
        seq = CounterMetricFamily(
            f"{p}_table_seq_scans", "Sequential scans of the largest tables.", labels=["profile", "table"]
        )
        idx = CounterMetricFamily(
            f"{p}_table_idx_scans", "Index scans of the largest tables.", labels=["profile", "table"]
        )
        unused = GaugeMetricFamily(f"{p}_unused_indexes", "Non-unique indexes never scanned.", labels=["profile"])
        stmt = GaugeMetricFamily(
            f"{p}_statement_mean_seconds", "Mean statement time (pg_stat_statements).", labels=["profile"]
        )
        lag = GaugeMetricFamily(
            f"{p}_replication_lag_bytes", "WAL not yet replayed by a replica.", labels=["profile", "replica"]
        )
        lag_s = GaugeMetricFamily(
            f"{p}_replication_lag_seconds", "Replay lag of a replica.", labels=["profile", "replica"]
        )
        pending = GaugeMetricFamily(
            f"{p}_settings_pending_restart", "Managed settings waiting for a restart.", labels=["profile"]
        )
        for profile, (snap, restarts) in items:
            for state, n in snap.connections.items():
                conns.add_metric([profile, state], n)
            maxc.add_metric([profile], snap.max_connections)
            if snap.max_connections:
                util.add_metric([profile], sum(snap.connections.values()) / snap.max_connections)
            dbsize.add_metric([profile], snap.database_bytes)
            for t in snap.tables:
                tsize.add_metric([profile, t.name], t.bytes)
                dead.add_metric([profile, t.name], t.dead_tuples)
                seq.add_metric([profile, t.name], t.seq_scan)
                idx.add_metric([profile, t.name], t.idx_scan)
            unused.add_metric([profile], len(snap.unused_indexes))
            if snap.statements_mean_seconds is not None:
                stmt.add_metric([profile], snap.statements_mean_seconds)
            for replica, (b, s) in snap.replication.items():
                if b is not None:
                    lag.add_metric([profile, replica], b)
                if s is not None:
                    lag_s.add_metric([profile, replica], s)
            pending.add_metric([profile], restarts)
        yield from (conns, maxc, util, dbsize, tsize, dead, seq, idx, unused, stmt, lag, lag_s, pending)


COLLECTOR = ProfileCollector()
