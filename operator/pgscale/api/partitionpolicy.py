"""PartitionPolicy: date partitioning of a live table, kept ahead and trimmed behind."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..durations import seconds
from .common import (
    AGE_COLUMN,
    NEVER_FIRES_RULE,
    READY_COLUMNS,
    Age,
    BaseStatus,
    Cron,
    Duration,
    Identifier,
    JobTemplate,
    KindInfo,
    Model,
    Period,
    PrinterColumn,
    ProfileReference,
    TableReference,
    Timestamp,
    cel,
)
from .retentionpolicy import ExportSpec, ExportStatus

Interval = Literal["daily", "weekly", "monthly", "quarterly", "yearly"]

# Tokens a naming pattern may use; {table} is the parent's name.
NAMING_TOKENS = ("{table}", "{YYYY}", "{MM}", "{DD}", "{Q}", "{IYYY}", "{IW}")
DEFAULT_NAMING: dict[str, str] = {
    "daily": "{table}_{YYYY}_{MM}_{DD}",
    "weekly": "{table}_{IYYY}_w{IW}",
    "monthly": "{table}_{YYYY}_{MM}",
    "quarterly": "{table}_{YYYY}_q{Q}",
    "yearly": "{table}_{YYYY}",
}


class ConversionSpec(Model):
    """How an existing, non-partitioned table is converted while it is in use."""

    enabled: bool = Field(
        default=True,
        description="Convert the table when it is not partitioned yet; when false, pgscale only reports.",
    )
    batch_size: int = Field(default=10000, ge=100, le=1000000, description="Rows moved per committed batch.")
    lock_timeout: Duration = Field(
        default="1s",
        description="Longest wait for a lock that blocks the table's readers or writers; the step is retried.",
    )
    max_retries: int = Field(
        default=60, ge=0, le=10000, description="Retries of a step whose lock could not be taken in time."
    )
    pause_between_batches: Duration = Field(
        default="0s", description="Pause after each batch, to leave room for the application."
    )
    widen_keys: bool = Field(
        default=False,
        description=(
            "Add the partition column to a primary key or unique constraint that lacks it "
            "(Postgres requires it on partitioned tables). Uniqueness then holds per "
            "(key, partition column) instead of per key."
        ),
    )
    drop_referencing_foreign_keys: bool = Field(
        default=False,
        description=(
            "Drop foreign keys of other tables that reference this table, at the switch (Postgres cannot "
            "point one at a partitioned table's key unless it includes the partition column). The Event "
            "names each one dropped."
        ),
    )
    keep_old_table: bool = Field(
        default=False,
        description=(
            "Keep the original table, renamed <table>_pgscale_old, after the switch; by default it is "
            "dropped once the partitioned copy was verified (count and checksum) against it."
        ),
    )

    @property
    def lock_timeout_ms(self) -> int:
        """lockTimeout in milliseconds, as Postgres' lock_timeout takes it."""
        return int(seconds(self.lock_timeout) * 1000)

    @property
    def pause_seconds(self) -> float:
        return seconds(self.pause_between_batches)


class RetentionSpec(Model):
    """Which old partitions leave the table, and how."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            ("(self.action == 'export') == has(self.export)", "export: required when action is export, and only then"),
        )
    }

    keep: Age = Field(description='How much history stays attached, e.g. 12mo or "12 months".')
    action: Literal["detach", "drop", "export"] = Field(
        default="detach",
        description=(
            "detach keeps old partitions as plain tables; drop deletes them and their rows; export writes each "
            "into a verified Parquet file (see export), then drops it."
        ),
    )
    export: ExportSpec | None = Field(default=None, description="Destination of the files, for action export.")
    archive_schema: Identifier | None = Field(
        default=None, description="Move detached partitions into this schema (created when missing)."
    )
    concurrently: bool = Field(
        default=True,
        description="Use DETACH PARTITION CONCURRENTLY where the server (14+) and layout allow it.",
    )


class MaintenanceSpec(Model):
    """When partitions are created ahead and trimmed behind."""

    interval: Period = Field(
        default="1h",
        description="How often the operator runs maintenance; at most 9999999s, 999999m, 9999h, 999d or 99w.",
    )
    cron_job: bool = Field(
        default=False,
        description="Also run `pgscale job partition-maintenance` from a CronJob on `schedule`.",
    )
    schedule: Cron = Field(
        default="@hourly", description="Cron schedule of the CronJob.", json_schema_extra=cel(NEVER_FIRES_RULE)
    )
    job: JobTemplate | None = Field(default=None, description="How the CronJob's pods run.")

    @property
    def interval_seconds(self) -> float:
        return seconds(self.interval)


class PartitionPolicySpec(Model):
    """Desired state of a PartitionPolicy."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            (
                "!has(self.namingPattern) || self.interval != 'weekly' || "
                "(self.namingPattern.contains('{IYYY}') && self.namingPattern.contains('{IW}'))",
                "namingPattern: weekly partitions need {IYYY} and {IW} in the name",
            ),
            (
                "!has(self.namingPattern) || self.interval == 'weekly' || self.namingPattern.contains('{YYYY}')",
                "namingPattern: must contain {YYYY}",
            ),
            (
                "!has(self.namingPattern) || !(self.interval in ['daily', 'monthly']) || "
                "self.namingPattern.contains('{MM}')",
                "namingPattern: daily and monthly partitions need {MM} in the name",
            ),
            (
                "!has(self.namingPattern) || self.interval != 'daily' || self.namingPattern.contains('{DD}')",
                "namingPattern: daily partitions need {DD} in the name",
            ),
            (
                "!has(self.namingPattern) || self.interval != 'quarterly' || self.namingPattern.contains('{Q}')",
                "namingPattern: quarterly partitions need {Q} in the name",
            ),
        )
    }

    profile_ref: ProfileReference = Field(description="DatabaseProfile whose database holds the table.")
    table: TableReference = Field(
        description="The table to partition.",
        json_schema_extra=cel(("self == oldSelf", "table is immutable; create a new policy")),
    )
    column: Identifier = Field(
        description="Partition column (timestamp, timestamptz or date), e.g. createdAt.",
        json_schema_extra=cel(("self == oldSelf", "column is immutable; create a new policy")),
    )
    interval: Interval = Field(
        description="Range covered by each partition.",
        json_schema_extra=cel(("self == oldSelf", "interval is immutable; create a new policy")),
    )
    naming_pattern: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z_{][A-Za-z0-9_{}]*$",
        description=(
            "Partition names; tokens {table} {YYYY} {MM} {DD} {Q} {IYYY} {IW}. Default by interval, "
            "e.g. {table}_{YYYY}_{MM} gives Task_2025_01."
        ),
    )
    premake: int = Field(default=4, ge=1, le=400, description="Future partitions kept ready, even when no rows arrive.")
    time_zone: str = Field(
        default="UTC",
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_+/-]*$",
        description="Time zone in which partition boundaries fall (IANA name, e.g. Europe/Berlin).",
    )
    default_partition: Literal["create", "none"] = Field(
        default="create",
        description=(
            "create keeps a DEFAULT partition for rows outside every range (maintenance moves "
            "them into their partition before creating it); none rejects such rows."
        ),
    )
    conversion: ConversionSpec | None = Field(default=None, description="Converting an existing table.")
    retention: RetentionSpec | None = Field(default=None, description="Detach or drop old partitions.")
    maintenance: MaintenanceSpec | None = Field(default=None, description="When maintenance runs.")
    suspend: bool = Field(default=False, description="Pause all changes; status is still reported.")

    # The one place where an absent sub-spec takes its defaults.
    @property
    def conversion_or_default(self) -> ConversionSpec:
        return self.conversion or ConversionSpec()

    @property
    def maintenance_or_default(self) -> MaintenanceSpec:
        return self.maintenance or MaintenanceSpec()

    @property
    def retention_action(self) -> Literal["detach", "drop", "export"]:
        """What happens to a retired partition: spec.retention.action, or its default without retention."""
        action: Literal["detach", "drop", "export"] = RetentionSpec.model_fields["action"].default
        return self.retention.action if self.retention else action


class PartitionInfo(Model):
    """One partition of the table."""

    name: str = Field(max_length=63, description="Partition table name.")
    from_: str | None = Field(default=None, alias="from", max_length=64, description="Inclusive lower bound.")
    to: str | None = Field(default=None, max_length=64, description="Exclusive upper bound.")
    is_default: bool = Field(default=False, description="The DEFAULT partition.")
    rows_estimate: int | None = Field(default=None, description="Row estimate from the planner's statistics.")
    bytes: int | None = Field(default=None, description="Size including indexes and TOAST.")


# Where a table's conversion stands, in order: the last step finished ("none": nothing started, or
# forgotten). The words of the state row (pg/conversion.py) and of status.conversion.step.
ConversionStep = Literal["none", "building", "prepared", "copied", "verified", "swapped", "done"]


class ProgressStatus(Model):
    """Progress of long work: counts, rate and ETA."""

    step: ConversionStep | None = Field(default=None, description="Current step.")
    rows_total: int | None = Field(default=None, description="Rows to process (estimate).")
    rows_done: int | None = Field(default=None, description="Rows processed so far.")
    rows_per_second: float | None = Field(default=None, description="Recent rate.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds left.")
    started_at: Timestamp | None = Field(default=None, description="When the work began.")
    longest_lock_ms: int | None = Field(
        default=None, description="Longest time a blocking lock was held by a step, in milliseconds."
    )


class MaintenanceRun(Model):
    """What the last maintenance did."""

    time: Timestamp = Field(description="When it ran.")
    created: list[str] = Field(
        default_factory=list, description="Partitions created.", json_schema_extra={"maxItems": 400}
    )
    detached: list[str] = Field(
        default_factory=list, description="Partitions detached.", json_schema_extra={"maxItems": 400}
    )
    dropped: list[str] = Field(
        default_factory=list, description="Partitions dropped.", json_schema_extra={"maxItems": 400}
    )
    exported: list[str] = Field(
        default_factory=list,
        description="Partitions exported into verified files, then dropped (retention.action export).",
        json_schema_extra={"maxItems": 400},
    )
    rows_moved_from_default: int = Field(default=0, description="Rows moved out of the DEFAULT partition.")


class PartitionPolicyStatus(BaseStatus):
    """Observed state of a PartitionPolicy."""

    partitioned: bool | None = Field(default=None, description="The table is partitioned.")
    partition_count: int | None = Field(default=None, description="Number of partitions, DEFAULT included.")
    partitions: list[PartitionInfo] = Field(
        default_factory=list,
        description="Partitions, oldest first (at most 100 listed).",
        json_schema_extra={"maxItems": 100},
    )
    conversion: ProgressStatus | None = Field(default=None, description="Conversion progress while it runs.")
    last_maintenance: MaintenanceRun | None = Field(default=None, description="Last maintenance run.")
    next_maintenance_time: Timestamp | None = Field(default=None, description="When maintenance runs next.")
    export: ExportStatus | None = Field(default=None, description="Files written by retention.action export.")


INFO = KindInfo(
    kind="PartitionPolicy",
    plural="partitionpolicies",
    singular="partitionpolicy",
    short_names=["pp", "pgpartition"],
    columns=[
        *READY_COLUMNS,
        PrinterColumn(name="Table", type="string", json_path=".spec.table.name"),
        PrinterColumn(name="Interval", type="string", json_path=".spec.interval"),
        PrinterColumn(name="Partitions", type="integer", json_path=".status.partitionCount"),
        PrinterColumn(name="Next", type="string", json_path=".status.nextMaintenanceTime", priority=1),
        AGE_COLUMN,
    ],
)
