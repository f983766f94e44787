"""The operator's own Prometheus metrics, under one prefix (pgscale_)."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - a pod's metrics port
        """Serve /metrics on a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)


METRICS = Metrics()
