"""RetentionPolicy: archive old rows (into a table or, exported, into Parquet files) and delete them on a
schedule, losing nothing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

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
    PrinterColumn,
    ProfileReference,
    TableReference,
    Timestamp,
    cel,
)
from .filemigration import Destination

FilterOperator = Literal["In", "NotIn", "Equals", "NotEquals", "LessThan", "GreaterThan", "IsNull", "IsNotNull"]


class RowFilter(Model):
    """A structured condition on one column; values are always bound parameters, never SQL."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            (
                "self.operator in ['IsNull', 'IsNotNull'] ? !has(self.values) || size(self.values) == 0 "
                ": has(self.values) && size(self.values) > 0",
                "filters[].values: required for In/NotIn/Equals/NotEquals/LessThan/GreaterThan, "
                "and must be empty for IsNull/IsNotNull",
            ),
            (
                "!(self.operator in ['Equals', 'NotEquals', 'LessThan', 'GreaterThan']) "
                "|| !has(self.values) || size(self.values) == 1",
                "filters[].values: Equals, NotEquals, LessThan and GreaterThan take exactly one value",
            ),
        )
    }

    column: Identifier = Field(description="Column to compare, exactly as in the database (e.g. status).")
    operator: FilterOperator = Field(description="Comparison.")
    values: list[str] | None = Field(
        default=None,
        description="Values, as text; Postgres casts them to the column's type (e.g. [COMPLETED]).",
        json_schema_extra={"maxItems": 100, "items": {"type": "string", "maxLength": 1024}},
    )


class ArchiveSpec(Model):
    """Where archived rows go."""

    schema_: Identifier | None = Field(
        default=None, alias="schema", description="Schema of the archive table; the source's when unset."
    )
    table: Identifier | None = Field(default=None, description="Archive table name; `<table>_archive` when unset.")
    create: bool = Field(
        default=True, description="Create the archive table with the source's columns when it is missing."
    )


DEFAULT_ROWS_PER_FILE = 100000


class ExportSpec(Model):
    """Where exported rows go: Parquet files (zstd), each with a manifest, on the destinations FileMigration uses."""

    destination: Destination = Field(
        description=(
            "An S3-compatible bucket (s3: bucket, prefix, endpoint, credentialsSecretRef, ...) or a volume "
            "(filesystem: claimName, path), exactly as in FileMigration."
        )
    )
    rows_per_file: int = Field(
        default=DEFAULT_ROWS_PER_FILE,
        ge=1,
        le=1000000,
        description=(
            "About this many rows per Parquet file: a batch covers the heap pages that hold them, and its "
            "rows stay locked while their file is written and read back."
        ),
    )


ChildMode = Literal["archive", "delete", "keep"]
# A name read from the catalog, matched as text and always quoted as an identifier: any characters
# PostgreSQL allows (up to 63 bytes), not only the plain identifiers a spec's own fields take.
CatalogName = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=r"^[^\x00]+$")]


class ChildTable(Model):
    """What happens to the rows of one referencing table whose parent rows leave."""

    schema_: CatalogName = Field(default="public", alias="schema", description="Schema of the referencing table.")
    name: CatalogName = Field(
        description="Name of the referencing table, exactly as in the database (any name; compared, never SQL)."
    )
    mode: ChildMode = Field(description="archive, delete or keep, for the rows of this table (see children.mode).")
    archive_table: CatalogName | None = Field(
        default=None, description="Archive table of this table's rows, for archive; `<name>_archive` when unset."
    )


class ChildrenSpec(Model):
    """Rows of other tables (and of this one) that reference the rows a run removes, through foreign keys."""

    mode: ChildMode | None = Field(
        default=None,
        description=(
            "For every referencing table not listed in tables: archive moves child rows into their own archive "
            "tables (with action export: their own files) in the same batch as their parents (children first, "
            "recursively); delete lets them go the "
            "way their ON DELETE action says, counted; keep skips parents that still have children. Unset: a "
            "policy whose table is referenced with ON DELETE CASCADE, SET NULL or SET DEFAULT is Stalled."
        ),
    )
    tables: list[ChildTable] = Field(
        default_factory=list,
        description="Per referencing table, overriding mode.",
        json_schema_extra={"maxItems": 64},
    )

    def mode_of(self, schema: str, table: str) -> ChildMode | None:
        """The mode for one referencing table: its own entry, else the default."""
        for entry in self.tables:
            if (entry.schema_, entry.name) == (schema, table):
                return entry.mode
        return self.mode

    def archive_table_of(self, schema: str, table: str) -> str | None:
        """The archive table named for one referencing table, if any."""
        for entry in self.tables:
            if (entry.schema_, entry.name) == (schema, table):
                return entry.archive_table
        return None


class RetentionPolicySpec(Model):
    """Desired state of a RetentionPolicy."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            (
                "self.action == 'archive' || !has(self.archive)",
                "archive: only allowed when action is archive",
            ),
            (
                "(self.action == 'export') == has(self.export)",
                "export: required when action is export, and only then",
            ),
            (
                "self.action != 'delete' || !has(self.children) || ((!has(self.children.mode) "
                "|| self.children.mode != 'archive') && (!has(self.children.tables) "
                "|| self.children.tables.all(t, t.mode != 'archive')))",
                "children: archive needs action archive or export (with action delete, use delete or keep)",
            ),
            (
                "!has(self.maxBatchSize) || self.maxBatchSize >= self.batchSize",
                "maxBatchSize: must be at least batchSize",
            ),
        )
    }

    profile_ref: ProfileReference = Field(description="DatabaseProfile whose database holds the table.")
    table: TableReference = Field(
        description="The table to trim.",
        json_schema_extra=cel(("self == oldSelf", "table is immutable; create a new policy")),
    )
    age_column: Identifier = Field(description="Timestamp or date column that ages a row, e.g. completedAt.")
    older_than: Age = Field(description="Rows older than this are archived or deleted, e.g. 90d.")
    filters: list[RowFilter] = Field(
        default_factory=list,
        description="Further conditions, all of which must hold (e.g. status In [COMPLETED]).",
        json_schema_extra={"maxItems": 16},
    )
    action: Literal["archive", "export", "delete"] = Field(
        default="archive",
        description=(
            "archive moves rows into the archive table; export moves them out of the database into Parquet "
            "files (see export); delete only deletes."
        ),
    )
    archive: ArchiveSpec | None = Field(default=None, description="Archive table, for action archive.")
    export: ExportSpec | None = Field(default=None, description="Destination of the files, for action export.")
    children: ChildrenSpec | None = Field(
        default=None,
        description="What happens to rows that reference the removed rows through foreign keys (see docs).",
    )
    batch_size: int = Field(
        default=1000,
        ge=1,
        le=100000,
        description=(
            "Rows in the first committed batch (a range of heap pages holding about this many rows, by the "
            "table's statistics), and the fewest a batch covers; see maxBatchSize."
        ),
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1000000,
        description=(
            "Largest batch, in rows its page range holds: from batchSize, batches double while one takes under "
            "5% of lockTimeout, and shrink (not below batchSize) when one takes over 10%. Unset: 50000 (or "
            "batchSize, if larger); set it to batchSize for fixed batches."
        ),
    )
    pause_between_batches: Duration = Field(
        default="0s", description="Pause after each batch, to leave room for the application."
    )
    lock_timeout: Duration = Field(default="1s", description="Longest wait for a row or table lock.")
    statement_timeout: Duration = Field(default="60s", description="Longest single batch statement.")
    max_run_time: Duration = Field(
        default="1h", description="A run stops cleanly after this long; the next run continues."
    )
    schedule: Cron = Field(
        default="0 2 1 * *",
        description="Cron schedule; monthly at 02:00 on the 1st, like the strategy.",
        json_schema_extra=cel(NEVER_FIRES_RULE),
    )
    time_zone: str = Field(
        default="UTC",
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_+/-]*$",
        description="Time zone of the schedule (CronJob timeZone). pg_cron always runs in GMT.",
    )
    scheduler: Literal["cronjob", "pg_cron"] = Field(
        default="cronjob",
        description="cronjob runs `pgscale job retention` from a CronJob; pg_cron schedules it in the database.",
    )
    partition_aware: bool = Field(
        default=True,
        description="Detach a whole partition past the cutoff instead of deleting it row by row.",
    )
    dry_run: bool = Field(default=False, description="Only count the rows a run would move.")
    suspend: bool = Field(default=False, description="Pause scheduled runs.")
    job: JobTemplate | None = Field(default=None, description="How the CronJob's pods run.")

    @property
    def batch_limit(self) -> int:
        """The largest batch a run may grow to."""
        return self.max_batch_size or max(DEFAULT_MAX_BATCH, self.batch_size)

    @property
    def children_or_default(self) -> ChildrenSpec:
        return self.children or ChildrenSpec()

    @property
    def export_or_default(self) -> ExportSpec:
        """The export section (present when action is export, which CEL enforces)."""
        if self.export is None:
            raise ValueError("spec.export is required for action export")
        return self.export


DEFAULT_MAX_BATCH = 50000


class RunStatus(Model):
    """One run of the policy."""

    start_time: Timestamp | None = Field(default=None, description="When the run started.")
    end_time: Timestamp | None = Field(default=None, description="When it ended.")
    rows_archived: int = Field(default=0, description="Rows moved into the archive.")
    rows_deleted: int = Field(default=0, description="Rows deleted without archiving.")
    rows_matched: int | None = Field(default=None, description="Rows a dry run would move.")
    rows_total: int | None = Field(default=None, description="Rows that matched when the run started.")
    rows_per_second: float | None = Field(default=None, description="Rate of the run so far.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds left, while running.")
    batches: int = Field(default=0, description="Committed batches.")
    duration_seconds: float | None = Field(default=None, description="Run time.")
    outcome: Literal["Running", "Succeeded", "Failed", "Partial", "DryRun"] | None = Field(
        default=None, description="How the run ended; Partial when maxRunTime cut it short."
    )
    message: str | None = Field(default=None, max_length=4096, description="Error or remark.")
    tables: dict[str, int] | None = Field(
        default=None,
        description="Rows per referencing table and effect, e.g. {'public.Message archived': 30}, "
        "and parents skipped per constraint.",
        json_schema_extra={"maxProperties": 256},
    )


class RelationshipStatus(Model):
    """A foreign key that references the policy's table, or one of the tables whose rows a run moves."""

    table: str = Field(max_length=200, description="The referencing table, schema-qualified.")
    constraint: str = Field(max_length=200, description="The foreign key constraint.")
    references: str = Field(max_length=200, description="The referenced table, schema-qualified.")
    on_delete: str = Field(max_length=16, description="Its ON DELETE action (CASCADE, SET NULL, RESTRICT, ...).")
    mode: str = Field(max_length=16, description="What runs do: archive, delete, keep, or unset.")
    effect: str = Field(max_length=16, description="archive, delete, setNull, setDefault or skipParent.")
    rows: int | None = Field(default=None, description="Rows of this table the next run would touch (estimate).")


class ExportStatus(Model):
    """What action export has written, from the ledger of exported files."""

    files: int = Field(default=0, description="Parquet files written and verified (manifests not counted).")
    rows: int = Field(default=0, description="Rows exported, children included.")
    bytes: int = Field(default=0, description="Bytes of the Parquet files.")
    database_bytes_freed: int = Field(
        default=0,
        description=(
            "Bytes the exported rows took in the database (row bytes, reusable after VACUUM; whole "
            "partitions: their size on disk, returned when dropped)."
        ),
    )
    oldest: Timestamp | None = Field(default=None, description="Oldest ageColumn value exported.")
    newest: Timestamp | None = Field(default=None, description="Newest ageColumn value exported.")
    restored_files: int = Field(default=0, description="Files restored with `pgscale archive restore`.")
    location: str | None = Field(default=None, max_length=1024, description="Where the files are.")


class TotalsStatus(Model):
    """Totals since the policy was created."""

    runs: int = Field(default=0, description="Runs recorded.")
    rows_archived: int = Field(default=0, description="Rows archived.")
    rows_deleted: int = Field(default=0, description="Rows deleted.")


class RetentionPolicyStatus(BaseStatus):
    """Observed state of a RetentionPolicy."""

    cron_job_name: str | None = Field(default=None, max_length=253, description="The CronJob running the policy.")
    pg_cron_job_id: int | None = Field(default=None, description="pg_cron job id, when pg_cron schedules it.")
    last_run: RunStatus | None = Field(default=None, description="The most recent run.")
    next_run_time: Timestamp | None = Field(default=None, description="When the next run is due.")
    totals: TotalsStatus | None = Field(default=None, description="Totals since creation.")
    relationships: list[RelationshipStatus] | None = Field(
        default=None,
        description="Foreign keys that reference the rows runs remove, recursively, and what runs do with them.",
        json_schema_extra={"maxItems": 100},
    )
    export: ExportStatus | None = Field(default=None, description="Files written by action export.")


INFO = KindInfo(
    kind="RetentionPolicy",
    plural="retentionpolicies",
    singular="retentionpolicy",
    short_names=["rp", "pgretention"],
    columns=[
        *READY_COLUMNS,
        PrinterColumn(name="Table", type="string", json_path=".spec.table.name"),
        PrinterColumn(name="Older-Than", type="string", json_path=".spec.olderThan"),
        PrinterColumn(name="Last-Run", type="string", json_path=".status.lastRun.outcome"),
        PrinterColumn(name="Archived", type="integer", json_path=".status.totals.rowsArchived", priority=1),
        PrinterColumn(name="Next", type="string", json_path=".status.nextRunTime", priority=1),
        AGE_COLUMN,
    ],
)
