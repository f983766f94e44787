"""Cache: a Redis-compatible cache beside the database, sized by tier, invalidated by Postgres itself.

The cache (Valkey by default) is provisioned as a Deployment; a trigger on each table in
``invalidate`` writes the keys a change makes stale into an outbox table in the writer's
transaction, and a relay (``pgscale cache relay``) deletes them in the cache.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from .common import (
    AGE_COLUMN,
    READY_COLUMNS,
    BaseStatus,
    KindInfo,
    Model,
    Period,
    PrinterColumn,
    ProfileReference,
    Quantity,
    ResourceRequirements,
    TableReference,
    cel,
)
from .databaseprofile import PrometheusObjectSpec

# A key template: constant text (no braces, whitespace or control characters) and {column}
# placeholders naming columns of the table, e.g. task:{id} or user-tasks:{userId}.
KEY_TEMPLATE_PATTERN = r"^([^{}\s\x00-\x1f\x7f]|\{[A-Za-z_][A-Za-z0-9_$]*\})+$"
KeyTemplate = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=KEY_TEMPLATE_PATTERN)]
DEFAULT_IMAGE = "valkey/valkey:8.1"
MaxmemoryPolicy = Literal[
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
    "noeviction",
]


class InvalidateRule(Model):
    """A table whose changes make cache keys stale: which keys, and/or which tag."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            ("size(self.keys) > 0 || has(self.tag)", "invalidate: set keys, tag, or both"),
        )
    }

    table: TableReference = Field(description='The table, exactly as in the database (e.g. name: "Task").')
    keys: list[KeyTemplate] = Field(
        default_factory=list,
        description=(
            "Key templates over the table's columns, e.g. task:{id}, user-tasks:{userId}; for an update, the "
            "keys of the old and of the new row are both invalidated."
        ),
        json_schema_extra={"maxItems": 16},
    )
    tag: KeyTemplate | None = Field(
        default=None,
        description=(
            "A set the application adds cache keys to (SADD); any change to the table deletes every key in it, "
            "then the set. May hold {column} placeholders like keys."
        ),
    )


class RelaySpec(Model):
    """The Deployment that deletes invalidated keys in the cache (`pgscale cache relay`)."""

    image: str | None = Field(
        default=None, max_length=512, description="Image running `pgscale cache relay`; the operator's by default."
    )
    batch_size: int = Field(default=500, ge=1, le=10000, description="Outbox rows handled per transaction.")
    poll_interval: Period = Field(
        default="5s", description="How often the outbox is read when no NOTIFY arrives (NOTIFY only wakes it)."
    )
    resources: ResourceRequirements | None = Field(default=None, description="Resources of the relay container.")


class CacheAlertsSpec(Model):
    """Alert thresholds, evaluated by the controller (the AlertsFiring condition) and, when asked for,
    by Prometheus (a PrometheusRule)."""

    hit_ratio_percent: int = Field(
        default=80, ge=0, le=100, description="Alert when the hit ratio is below this share of reads; 0 turns it off."
    )
    memory_percent: int = Field(
        default=80,
        ge=1,
        le=100,
        description="Alert when the server's resident memory exceeds this share of memory (the container's limit).",
    )
    relay_lag_seconds: int = Field(
        default=60, ge=1, le=86400, description="Alert when the oldest invalidation has waited longer than this."
    )
    prometheus_rule: PrometheusObjectSpec | None = Field(
        default=None, description="Render the thresholds as a PrometheusRule."
    )

    @property
    def prometheus_rule_or_default(self) -> PrometheusObjectSpec:
        return self.prometheus_rule or PrometheusObjectSpec()


class CacheSpec(Model):
    """Desired state of a Cache."""

    profile_ref: ProfileReference = Field(description="DatabaseProfile whose database the invalidation triggers use.")
    image: str = Field(
        default=DEFAULT_IMAGE,
        max_length=512,
        description="Redis-protocol server image (Valkey by default; a Redis image works too).",
    )
    memory: Quantity | None = Field(
        default=None,
        description=(
            "Memory of the cache container (its request and limit); maxmemory leaves headroom below it. "
            "Defaults by the profile's tier: development 256Mi, production 1Gi, high-load 4Gi."
        ),
    )
    maxmemory_percent: int = Field(
        default=75,
        ge=10,
        le=95,
        description="maxmemory as a share of memory; the rest is headroom for the process, buffers and fragmentation.",
    )
    maxmemory_policy: MaxmemoryPolicy = Field(
        default="allkeys-lru", description="Which keys go when maxmemory is reached."
    )
    persistence: Literal["off", "rdb", "aof"] = Field(
        default="off",
        description="off: a pure cache; rdb or aof write to the pod's emptyDir (kept over a container restart only).",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request of the cache container, e.g. 250m.")
    invalidate: list[InvalidateRule] = Field(
        default_factory=list,
        description="Tables whose changes invalidate keys, through a trigger and the relay.",
        json_schema_extra={
            "maxItems": 32,
            **cel(
                (
                    "self.all(a, self.exists_one(b, b.table.name == a.table.name && "
                    "(has(b.table.schema) ? b.table.schema : 'public') == "
                    "(has(a.table.schema) ? a.table.schema : 'public')))",
                    "invalidate: each table at most once; put all its keys in one entry",
                ),
            ),
        },
    )
    relay: RelaySpec | None = Field(default=None, description="The relay Deployment's settings.")
    alerts: CacheAlertsSpec | None = Field(default=None, description="Alert thresholds; defaults when unset.")
    pod_monitor: PrometheusObjectSpec | None = Field(
        default=None, description="A PodMonitor (prometheus-operator) for the relay's metrics port."
    )

    @property
    def relay_or_default(self) -> RelaySpec:
        return self.relay or RelaySpec()

    @property
    def alerts_or_default(self) -> CacheAlertsSpec:
        return self.alerts or CacheAlertsSpec()

    @property
    def pod_monitor_or_default(self) -> PrometheusObjectSpec:
        return self.pod_monitor or PrometheusObjectSpec()


class CacheStatus(BaseStatus):
    """Observed state of a Cache."""

    service: str | None = Field(default=None, max_length=253, description="Service the application connects to.")
    app_secret: str | None = Field(
        default=None, max_length=253, description="Secret with the connection URL (keys url, host, port, password)."
    )
    maxmemory: str | None = Field(default=None, max_length=32, description="maxmemory in effect, e.g. 192Mi.")
    maxmemory_bytes: int | None = Field(default=None, description="maxmemory in bytes.")
    tables: list[str] = Field(
        default_factory=list,
        description="Tables whose invalidation trigger is installed.",
        json_schema_extra={"maxItems": 32},
    )
    outbox: str | None = Field(default=None, max_length=253, description="The outbox table, schema-qualified.")
    outbox_depth: int | None = Field(default=None, description="Invalidations waiting for the relay.")
    config_hash: str | None = Field(default=None, max_length=64, description="Hash of the rendered server config.")
    hit_ratio: float | None = Field(
        default=None, description="keyspace_hits / (hits + misses) since the server started, as the relay last saw it."
    )
    used_memory_rss_bytes: int | None = Field(
        default=None, description="The server's resident memory, as the relay last saw it."
    )
    prometheus_rule: str | None = Field(default=None, max_length=253, description="The PrometheusRule, when rendered.")


INFO = KindInfo(
    kind="Cache",
    plural="caches",
    singular="cache",
    short_names=["pgcache"],
    columns=[
        *READY_COLUMNS,
        PrinterColumn(name="Maxmemory", type="string", json_path=".status.maxmemory"),
        PrinterColumn(name="Policy", type="string", json_path=".spec.maxmemoryPolicy"),
        PrinterColumn(name="Outbox", type="integer", json_path=".status.outboxDepth"),
        PrinterColumn(name="Service", type="string", json_path=".status.service", priority=1),
        AGE_COLUMN,
    ],
)
