"""DatabaseProfile: one existing Postgres, and how pgscale scales it.

A profile does not own the primary's lifecycle. It holds the connection that
every other pgscale kind reuses, and applies settings, a PgBouncer pooler, read
replicas, monitoring and capacity projections to the server that is there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import (
    AGE_COLUMN,
    READY_COLUMNS,
    BaseStatus,
    Identifier,
    KindInfo,
    LocalObjectReference,
    Model,
    ObjectName,
    Period,
    PrinterColumn,
    Quantity,
    ResourceRequirements,
    Timestamp,
    cel,
)

# Settings that would break the server, replication or pgscale's own connection when
# changed through ALTER SYSTEM. The same list is enforced by the CRD (CEL) and by
# pgscale.tuning before anything is applied.
FORBIDDEN_PARAMETERS: tuple[str, ...] = (
    "archive_cleanup_command",
    "archive_command",
    "archive_library",
    "archive_mode",
    "cluster_name",
    "config_file",
    "data_directory",
    "dynamic_library_path",
    "external_pid_file",
    "hba_file",
    "hot_standby",
    "ident_file",
    "listen_addresses",
    "port",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "recovery_end_command",
    "recovery_min_apply_delay",
    "recovery_target",
    "recovery_target_action",
    "recovery_target_inclusive",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_timeline",
    "recovery_target_xid",
    "restore_command",
    "ssl",
    "ssl_ca_file",
    "ssl_cert_file",
    "ssl_crl_dir",
    "ssl_crl_file",
    "ssl_dh_params_file",
    "ssl_key_file",
    "ssl_passphrase_command",
    "ssl_passphrase_command_supports_reload",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_level",
)

# PgBouncer settings a user may set through pooling.parameters (like CloudNativePG's
# allow-list); everything that decides where PgBouncer listens or authenticates is ours.
PGBOUNCER_PARAMETERS: tuple[str, ...] = (
    "application_name_add_host",
    "autodb_idle_timeout",
    "client_idle_timeout",
    "client_login_timeout",
    "disable_pqexec",
    "idle_transaction_timeout",
    "ignore_startup_parameters",
    "log_connections",
    "log_disconnections",
    "log_pooler_errors",
    "log_stats",
    "max_prepared_statements",
    "max_user_connections",
    "query_timeout",
    "query_wait_timeout",
    "reserve_pool_timeout",
    "server_check_delay",
    "server_check_query",
    "server_connect_timeout",
    "server_fast_close",
    "server_idle_timeout",
    "server_lifetime",
    "server_login_retry",
    "server_reset_query",
    "server_reset_query_always",
    "server_round_robin",
    "stats_period",
    "tcp_keepalive",
    "verbose",
)


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


Tier = Literal["development", "production", "high-load"]


class SecretKeys(Model):
    """Which keys of the Secret hold what, when they differ from the usual names."""

    uri: str = Field(default="uri", max_length=253, description="Key holding a postgresql:// URI.")
    host: str = Field(default="host", max_length=253, description="Key holding the host name.")
    port: str = Field(default="port", max_length=253, description="Key holding the port.")
    dbname: str = Field(default="dbname", max_length=253, description="Key holding the database name.")
    user: str = Field(
        default="username",
        max_length=253,
        description="Key holding the user name (the key `user` is also tried).",
    )
    password: str = Field(default="password", max_length=253, description="Key holding the password.")


class SecretConnectionReference(Model):
    """The Secret that holds the credentials, in CloudNativePG's or Zalando's layout."""

    name: ObjectName = Field(description="Name of the Secret in the same namespace.")
    keys: SecretKeys | None = Field(
        default=None,
        description=(
            "Key names inside the Secret. Defaults accept CloudNativePG's app Secret "
            "(uri, host, port, dbname, username, password) and Zalando's (username, password)."
        ),
    )


class ConnectionSpec(Model):
    """How pgscale reaches the primary. Explicit fields override what the Secret holds."""

    secret_ref: SecretConnectionReference = Field(
        description="Secret with a `uri`, or `host`/`port`/`dbname`/`username`/`password` keys."
    )
    host: str | None = Field(
        default=None,
        max_length=253,
        description="Host of the primary; overrides the Secret (Zalando Secrets carry no host).",
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="Port of the primary.")
    dbname: str | None = Field(default=None, max_length=63, description="Database to manage; overrides the Secret.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, description="libpq sslmode used by pgscale's connections."
    )
    connect_timeout_seconds: int = Field(
        default=10, ge=1, le=300, description="Seconds to wait for a connection before giving up."
    )


class ResourcesSpec(Model):
    """The primary's hardware, from which settings are computed pgtune-style."""

    cpu: int = Field(ge=1, le=512, description="CPU cores available to the primary.")
    memory: Quantity = Field(description="Memory available to the primary, e.g. 16Gi.")
    storage: Literal["ssd", "hdd", "network"] = Field(
        default="ssd",
        description="Storage type: decides random_page_cost and effective_io_concurrency.",
    )
    max_connections: int | None = Field(
        default=None,
        ge=10,
        le=10000,
        description="Expected max_connections; work_mem is sized from it. Defaults by memory.",
    )


class PoolingSpec(Model):
    """A PgBouncer pooler in front of the primary (and of the replicas, when there are any)."""

    instances: int = Field(default=1, ge=1, le=16, description="PgBouncer pods per pooler.")
    pool_mode: Literal["session", "transaction", "statement"] = Field(
        default="transaction", description="When a server connection returns to the pool."
    )
    default_pool_size: int = Field(default=20, ge=1, le=10000, description="Server connections per user/database pair.")
    min_pool_size: int = Field(default=0, ge=0, le=10000, description="Connections kept open when idle.")
    reserve_pool_size: int = Field(
        default=0, ge=0, le=10000, description="Extra connections allowed when clients wait."
    )
    max_client_connections: int = Field(
        default=1000, ge=1, le=1000000, description="Client connections PgBouncer accepts (max_client_conn)."
    )
    max_db_connections: int = Field(
        default=0, ge=0, le=100000, description="Cap of server connections per database; 0 means none."
    )
    parameters: dict[str, str] = Field(
        default_factory=dict,
        description="Further PgBouncer settings, from an allow-list (docs/databaseprofile.md).",
        json_schema_extra={
            "maxProperties": 64,
            "additionalProperties": {"type": "string", "maxLength": 1024},
            **cel(
                (
                    f"self.all(k, k in {_cel_list(PGBOUNCER_PARAMETERS)})",
                    "pooling.parameters: only PgBouncer keys from the allow-list in "
                    "docs/databaseprofile.md may be set; listen, auth and pool-size keys have "
                    "their own fields",
                )
            ),
        },
    )
    read_replicas: bool = Field(
        default=True, description="Also run a pooler for the read replicas (`<name>-pooler-ro`)."
    )
    image: str | None = Field(
        default=None, max_length=512, description="PgBouncer image; defaults to the operator's setting."
    )
    resources: ResourceRequirements | None = Field(default=None, description="PgBouncer container resources.")


class ReplicaStorage(Model):
    """The volume each replica keeps its copy of the data in."""

    size: Quantity = Field(description="Size of each replica's volume, e.g. 50Gi.")
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="StorageClass of the volumes; the default class if unset."
    )


class ReadReplicasSpec(Model):
    """Hot standbys streaming from the primary, behind a read-only Service."""

    instances: int = Field(default=1, ge=0, le=16, description="Number of streaming replicas.")
    replication_secret_ref: LocalObjectReference = Field(
        description="Secret with `username`/`password` of a role that has REPLICATION."
    )
    storage: ReplicaStorage = Field(description="Volume of each replica.")
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Postgres image of the replicas (same major version as the primary).",
    )
    primary_host: str | None = Field(
        default=None,
        max_length=253,
        description="Host the replicas stream from; defaults to the connection's host.",
    )
    resources: ResourceRequirements | None = Field(default=None, description="Replica container resources.")


class PrometheusObjectSpec(Model):
    """An optional prometheus-operator object."""

    enabled: bool = Field(default=False, description="Create the object.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels, e.g. the `release` label your Prometheus selects on.",
        json_schema_extra={"maxProperties": 32},
    )


class AlertsSpec(Model):
    """Alert thresholds; the strategy's values are the defaults."""

    enabled: bool = Field(default=True, description="Evaluate the thresholds (conditions and Events).")
    connection_utilization_percent: int = Field(
        default=80, ge=1, le=100, description="Alert when connections in use exceed this share of max_connections."
    )
    query_time_seconds: float = Field(
        default=1.0, gt=0, le=86400, description="Alert when mean statement time exceeds this."
    )
    growth_per_month: Quantity = Field(
        default="10Gi", description="Alert when the database grows faster than this per month."
    )
    memory_percent: int = Field(
        default=80, ge=1, le=100, description="Alert when configured memory use exceeds this share of memory."
    )
    replication_lag_seconds: int = Field(
        default=60, ge=1, le=86400, description="Alert when a replica lags more than this."
    )
    prometheus_rule: PrometheusObjectSpec | None = Field(
        default=None, description="Render the thresholds as a PrometheusRule."
    )


class MonitoringSpec(Model):
    """Metrics, alerts and capacity sampling."""

    enabled: bool = Field(default=True, description="Export metrics for this database.")
    interval: Period = Field(default="60s", description="How often metrics are collected.")
    statements: bool = Field(default=True, description="Read query times from pg_stat_statements when it is installed.")
    alerts: AlertsSpec | None = Field(default=None, description="Thresholds; strategy defaults when unset.")

    @property
    def alerts_or_default(self) -> AlertsSpec:
        return self.alerts or AlertsSpec()


class CapacitySpec(Model):
    """Size sampling and the projection of growth."""

    sample_interval: Period = Field(default="1h", description="How often database and table sizes are sampled.")
    horizon_months: int = Field(default=12, ge=1, le=120, description="How far ahead sizes are projected.")


SettingsMethod = Literal["auto", "alterSystem", "database", "cloudnativepg"]
AppliedMethod = Literal["alterSystem", "database", "cloudnativepg"]


class SettingsSpec(Model):
    """How settings, replicas and the pooler reach the server: who owns its configuration."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            (
                "!has(self.role) || self.method in ['auto', 'database']",
                "settings.role: only the database method applies settings per role",
            ),
            (
                "!has(self.clusterRef) || self.method in ['auto', 'cloudnativepg']",
                "settings.clusterRef: only the cloudnativepg method uses a CloudNativePG Cluster",
            ),
        )
    }

    method: SettingsMethod = Field(
        default="auto",
        description=(
            "alterSystem: ALTER SYSTEM on the server (needs superuser or the ALTER SYSTEM privilege). "
            "database: ALTER DATABASE ... SET for the settings a database may carry (managed services, "
            "shared servers); server-level settings are listed in status for the provider's parameter group. "
            "cloudnativepg: the CloudNativePG Cluster's spec.postgresql.parameters, instances and Pooler "
            "resources. auto: picked from what the server and the cluster show; status.settingsMethod says which."
        ),
    )
    cluster_ref: LocalObjectReference | None = Field(
        default=None,
        description=(
            "The CloudNativePG Cluster serving this database (cloudnativepg method); by default the one named "
            "by the connection Secret's cnpg.io/cluster label."
        ),
    )
    role: ObjectName | None = Field(
        default=None,
        description=(
            "database method: apply as ALTER ROLE <role> IN DATABASE ... SET (only that role's new sessions "
            "see the values) instead of ALTER DATABASE ... SET."
        ),
    )


class DatabaseProfileSpec(Model):
    """Desired state of a DatabaseProfile."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            ("!(has(self.tier) && has(self.resources))", "set either tier or resources, not both"),
        )
    }

    connection: ConnectionSpec = Field(description="How to reach the primary.")
    tier: Tier | None = Field(
        default=None,
        description=(
            "Preset settings for the strategy's hardware: development (2 CPU/4 GB), "
            "production (4 CPU/16 GB), high-load (8 CPU/32 GB)."
        ),
    )
    resources: ResourcesSpec | None = Field(
        default=None, description="Hardware to compute settings from, instead of a tier."
    )
    settings: SettingsSpec | None = Field(
        default=None, description="How settings are applied (method auto when unset)."
    )
    parameters: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Postgres settings (applied as spec.settings.method says); they override the tier or resources. "
            'Values are strings, as in postgresql.conf ("200", "256MB").'
        ),
        json_schema_extra={
            "maxProperties": 256,
            "additionalProperties": {"type": "string", "maxLength": 1024},
            **cel(
                (
                    "self.all(k, k.matches('^[a-z][a-z0-9_]*([.][a-z][a-z0-9_]*)?$'))",
                    "parameters: names are lower-case Postgres setting names like work_mem",
                ),
                (
                    f"self.all(k, !(k in {_cel_list(FORBIDDEN_PARAMETERS)}))",
                    "parameters: this setting would break the server, replication or pgscale's "
                    "connection and cannot be managed (see docs/databaseprofile.md)",
                    f"'parameters.' + self.filter(k, k in {_cel_list(FORBIDDEN_PARAMETERS)})[0] + "
                    "' would break the server, replication or pgscale\\'s connection and cannot be "
                    "managed; remove it (see docs/databaseprofile.md)'",
                ),
            ),
        },
    )
    state_schema: Identifier = Field(
        default="pgscale",
        description="Schema where pgscale keeps its bookkeeping tables (run log, size samples, ledgers).",
        json_schema_extra=cel(("self == oldSelf", "stateSchema is immutable")),
    )
    pooling: PoolingSpec | None = Field(default=None, description="Run a PgBouncer pooler.")
    read_replicas: ReadReplicasSpec | None = Field(default=None, description="Run streaming read replicas.")
    monitoring: MonitoringSpec | None = Field(default=None, description="Metrics and alerts; on by default.")
    capacity: CapacitySpec | None = Field(default=None, description="Capacity sampling; on by default.")
    reconcile_interval: Period = Field(
        default="5m", description="How often settings are re-checked and drift corrected."
    )

    # The one place where an absent sub-spec takes its defaults.
    @property
    def monitoring_or_default(self) -> MonitoringSpec:
        return self.monitoring or MonitoringSpec()

    @property
    def capacity_or_default(self) -> CapacitySpec:
        return self.capacity or CapacitySpec()

    @property
    def settings_or_default(self) -> SettingsSpec:
        return self.settings or SettingsSpec()


class ParameterStatus(Model):
    """A managed setting: what the spec asks and what the server runs with."""

    name: str = Field(max_length=128, description="Setting name.")
    desired: str = Field(max_length=1024, description="Value pgscale applies.")
    effective: str | None = Field(default=None, max_length=1024, description="Value the server reports now.")
    source: Literal["tier", "resources", "parameters"] = Field(description="Where the desired value comes from.")
    pending_restart: bool = Field(default=False, description="The new value waits for a server restart.")
    applied: bool = Field(
        default=True,
        description=(
            "pgscale applied the value. False: the method cannot set it (a server-level setting under the "
            "database method); set it in the provider's parameter group or the server's configuration."
        ),
    )


class ReplicaStatus(Model):
    """One read replica as the primary sees it."""

    name: str = Field(max_length=253, description="Pod name of the replica.")
    slot: str = Field(max_length=63, description="Physical replication slot on the primary.")
    active: bool = Field(default=False, description="A standby is streaming from the slot.")
    lag_bytes: int | None = Field(default=None, description="WAL bytes the replica has not replayed.")
    lag_seconds: float | None = Field(default=None, description="Replay lag in seconds.")


class TableCapacity(Model):
    """Size and growth of one of the largest tables."""

    name: str = Field(max_length=256, description="Schema-qualified table name.")
    bytes: int = Field(description="Total size including indexes and TOAST.")
    growth_bytes_per_month: int | None = Field(default=None, description="Observed growth per month.")


class CapacityStatus(Model):
    """Current size, growth and projection."""

    sampled_at: Timestamp | None = Field(default=None, description="Time of the latest sample.")
    database_bytes: int | None = Field(default=None, description="Current database size.")
    database_size: str | None = Field(default=None, max_length=32, description="Current size, human-readable.")
    growth_bytes_per_month: int | None = Field(default=None, description="Observed growth per month.")
    projected_bytes: int | None = Field(default=None, description="Projected size at the horizon.")
    horizon_months: int | None = Field(default=None, description="Months the projection looks ahead.")
    recommended_tier: Tier | None = Field(default=None, description="Tier the projected size calls for.")
    tables: list[TableCapacity] = Field(
        default_factory=list, description="Largest tables.", json_schema_extra={"maxItems": 20}
    )


class ActiveAlert(Model):
    """A threshold currently exceeded."""

    name: str = Field(max_length=128, description="Alert name.")
    value: float = Field(description="Observed value.")
    threshold: float = Field(description="Configured threshold.")
    since: Timestamp = Field(description="When the threshold was first exceeded.")


class PoolerStatus(Model):
    """The PgBouncer pooler in front of the primary."""

    service: str = Field(max_length=253, description="Service clients connect to for the primary (port 5432).")
    read_only_service: str | None = Field(
        default=None, max_length=253, description="Service pooling connections to the read replicas."
    )
    instances: int = Field(description="PgBouncer pods asked for.")
    config_hash: str = Field(max_length=64, description="Hash of the generated configuration.")


class DatabaseProfileStatus(BaseStatus):
    """Observed state of a DatabaseProfile."""

    pooler: PoolerStatus | None = Field(default=None, description="The pooler, when pooling is on.")
    prometheus_rule: str | None = Field(
        default=None, max_length=253, description="The PrometheusRule holding the alert thresholds, when enabled."
    )

    server_version: str | None = Field(default=None, max_length=64, description="Postgres server version.")
    system_identifier: str | None = Field(
        default=None,
        max_length=32,
        description="The server's system identifier (pg_control_system()): profiles with the same one share "
        "server-wide settings, which only the earliest of them may set.",
    )
    database: str | None = Field(
        default=None,
        max_length=63,
        description="The database the connection reaches: where the database method sets its values; profiles "
        "of that method on the same database (and settings.role) share them, which only the earliest may set.",
    )
    settings_method: AppliedMethod | None = Field(
        default=None, description="How settings are applied now (spec.settings.method, auto resolved)."
    )
    settings_method_reason: str | None = Field(
        default=None, max_length=512, description="Why that method: what the server and the cluster showed."
    )
    cluster: str | None = Field(
        default=None, max_length=253, description="The CloudNativePG Cluster whose configuration pgscale manages."
    )
    parameters: list[ParameterStatus] = Field(
        default_factory=list, description="Every managed setting.", json_schema_extra={"maxItems": 512}
    )
    pending_restart: list[str] = Field(
        default_factory=list,
        description="Settings that take effect only after a restart.",
        json_schema_extra={"maxItems": 512},
    )
    replicas: list[ReplicaStatus] | None = Field(
        default=None, description="Read replicas and their lag.", json_schema_extra={"maxItems": 16}
    )
    capacity: CapacityStatus | None = Field(default=None, description="Size and growth.")
    alerts: list[ActiveAlert] = Field(
        default_factory=list, description="Thresholds exceeded now.", json_schema_extra={"maxItems": 32}
    )
    last_reconcile_time: Timestamp | None = Field(default=None, description="End of the last reconcile.")


INFO = KindInfo(
    kind="DatabaseProfile",
    plural="databaseprofiles",
    singular="databaseprofile",
    short_names=["dbp", "pgprofile"],
    columns=[
        *READY_COLUMNS,
        PrinterColumn(name="Tier", type="string", json_path=".spec.tier"),
        PrinterColumn(name="Version", type="string", json_path=".status.serverVersion"),
        PrinterColumn(name="Size", type="string", json_path=".status.capacity.databaseSize"),
        PrinterColumn(name="Replicas", type="integer", json_path=".spec.readReplicas.instances", priority=1),
        AGE_COLUMN,
    ],
)
