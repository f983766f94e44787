"""The operator's own Prometheus metrics, under one prefix (pgscale_)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "pgscale"


@dataclass
class Metrics:
    """All metric families, registered on one registry the metrics endpoint serves."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconcile_total = Counter(
            f"{PREFIX}_reconcile", "Reconciles by kind and outcome.", ["kind", "outcome"], registry=r
        )
        self.reconcile_seconds = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Time spent in one reconcile.",
            ["kind"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.queue_depth = Gauge(f"{PREFIX}_workqueue_depth", "Resources waiting for a worker.", registry=r)
        self.resources = Gauge(f"{PREFIX}_resources", "Resources watched, by kind.", ["kind"], registry=r)
        self.leader = Gauge(
            f"{PREFIX}_leader", "1 on the replica that reconciles (holds the leader Lease), 0 on a standby.", registry=r
        )

        labels = ["policy"]  # namespace/name, as the profile collector names profiles
        self.export_files = Gauge(
            f"{PREFIX}_export_files", "Parquet files a RetentionPolicy exported (verified).", labels, registry=r
        )
        self.export_rows = Gauge(f"{PREFIX}_export_rows", "Rows a RetentionPolicy exported.", labels, registry=r)
        self.export_bytes = Gauge(
            f"{PREFIX}_export_bytes", "Bytes of the Parquet files a RetentionPolicy exported.", labels, registry=r
        )
        self.export_freed = Gauge(
            f"{PREFIX}_export_database_bytes_freed",
            "Bytes the exported rows took in the database.",
            labels,
            registry=r,
        )
        self.export_newest = Gauge(
            f"{PREFIX}_export_newest_timestamp_seconds",
            "Newest ageColumn value a RetentionPolicy exported (Unix time).",
            labels,
            registry=r,
        )

        split = ["split"]  # namespace/name
        self.split_lag = Gauge(
            f"{PREFIX}_split_lag_bytes",
            "WAL a DatabaseSplit's subscriber has not confirmed (the direction writes flow now).",
            split,
            registry=r,
        )
        self.split_block = Gauge(
            f"{PREFIX}_split_longest_write_block_seconds",
            "Longest time a DatabaseSplit's cutover or rollback blocked writes.",
            split,
            registry=r,
        )
        self.split_target = Gauge(
            f"{PREFIX}_split_writes_to_target",
            "1 when a DatabaseSplit's writes go to the target, else 0.",
            split,
            registry=r,
        )
        self.split_ready = Gauge(
            f"{PREFIX}_split_tables_ready",
            "Tables of a DatabaseSplit whose subscription is streaming.",
            split,
            registry=r,
        )

    def split(
        self, split: str, *, lag_bytes: int | None, longest_block_ms: int | None, on_target: bool, ready: int
    ) -> None:
        """Set the gauges of one DatabaseSplit (``namespace/name``) from its status."""
        if lag_bytes is not None:
            self.split_lag.labels(split).set(lag_bytes)
        if longest_block_ms is not None:
            self.split_block.labels(split).set(longest_block_ms / 1000)
        self.split_target.labels(split).set(1 if on_target else 0)
        self.split_ready.labels(split).set(ready)

    def export(self, policy: str, totals: Any) -> None:
        """Set the export gauges of one RetentionPolicy (``namespace/name``) from the ledger's totals
        (pg.export.Totals)."""
        self.export_files.labels(policy).set(totals.files)
        self.export_rows.labels(policy).set(totals.rows)
        self.export_bytes.labels(policy).set(totals.bytes)
        self.export_freed.labels(policy).set(totals.row_bytes)
        if totals.newest is not None:
            self.export_newest.labels(policy).set(totals.newest.timestamp())

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - a pod's metrics port
        """Serve /metrics on a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)


METRICS = Metrics()
