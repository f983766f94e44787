"""DatabaseSplit: move a domain's tables into a database of their own, online, with a way back."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..durations import seconds
from .common import (
    AGE_COLUMN,
    READY_COLUMNS,
    BaseStatus,
    Duration,
    Identifier,
    KindInfo,
    Model,
    ObjectName,
    PrinterColumn,
    ProfileReference,
    TableReference,
    Timestamp,
    cel,
)

DesiredPhase = Literal["replicate", "cutover", "rollback", "finalize"]
CrossForeignKeys = Literal["refuse", "skip"]


class SplitEndpoint(Model):
    """One side of the split: a DatabaseProfile, and how the other server reaches it for replication."""

    profile_ref: ProfileReference = Field(
        description="DatabaseProfile (same namespace) whose connection the operator uses for this database.",
        json_schema_extra=cel(("self == oldSelf", "profileRef is immutable; create a new DatabaseSplit")),
    )
    replication_host: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[A-Za-z0-9.:_-]+$",
        description=(
            "Host the other server's subscription connects to, when it differs from the host the operator "
            "uses (e.g. an in-cluster Service name); the profile's host when unset."
        ),
    )
    replication_port: int | None = Field(
        default=None, ge=1, le=65535, description="Port for replicationHost; the profile's port when unset."
    )


class LockBudget(Model):
    """How long a cutover may wait for its lock, and how often it tries again."""

    lock_timeout: Duration = Field(
        default="2s",
        description="Longest wait for the lock that blocks writes to the moved tables; the cutover is retried.",
    )
    retries: int = Field(default=30, ge=0, le=10000, description="Retries of a cutover whose lock was not taken.")
    catch_up_timeout: Duration = Field(
        default="10s",
        description=(
            "Longest time writes stay blocked while the other side applies the last changes; past it the "
            "cutover is undone (nothing changed) and retried."
        ),
    )

    @property
    def lock_timeout_ms(self) -> int:
        """lockTimeout in milliseconds, as Postgres' lock_timeout takes it."""
        return max(1, int(seconds(self.lock_timeout) * 1000))

    @property
    def catch_up_seconds(self) -> float:
        return max(0.1, seconds(self.catch_up_timeout))


class DatabaseSplitSpec(Model):
    """Desired state of a DatabaseSplit."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            ("has(self.tables) != has(self.schema)", "set exactly one of tables or schema"),
            (
                "self.source.profileRef.name != self.target.profileRef.name",
                "source and target must be different DatabaseProfiles",
            ),
            (
                "has(self.tables) == has(oldSelf.tables) && has(self.schema) == has(oldSelf.schema)",
                "tables and schema are immutable; create a new DatabaseSplit",
            ),
        )
    }

    source: SplitEndpoint = Field(description="Where the tables are now (the monolith's database).")
    target: SplitEndpoint = Field(description="Where the tables move to (their own database).")
    tables: list[TableReference] | None = Field(
        default=None,
        min_length=1,
        description="The tables to move, named exactly as in the source database.",
        json_schema_extra={
            "maxItems": 100,
            **cel(("self == oldSelf", "tables is immutable; create a new DatabaseSplit")),
        },
    )
    schema_: Identifier | None = Field(
        default=None,
        alias="schema",
        description="Move every table of this schema (instead of a tables list).",
        json_schema_extra=cel(("self == oldSelf", "schema is immutable; create a new DatabaseSplit")),
    )
    phase: DesiredPhase = Field(
        default="replicate",
        description=(
            "replicate: copy and stream source to target; cutover: move writes to the target (the source "
            "tables become read-only, a reverse subscription keeps them current); rollback: move writes "
            "back to the source; finalize: drop the replication objects (after cutover only)."
        ),
    )
    cross_foreign_keys: CrossForeignKeys = Field(
        default="refuse",
        description=(
            "Foreign keys between a moved and an unmoved table: refuse (the split waits until they are "
            "dropped), or skip (they stay on the source and are not created on the target)."
        ),
    )
    lock_budget: LockBudget | None = Field(default=None, description="The cutover's lock timeout and retries.")
    secret_name: ObjectName | None = Field(
        default=None,
        description=(
            "Secret pgscale writes with the connection (uri, host, port, dbname, username, password) of the "
            "database that takes the writes now; <name>-connection when unset."
        ),
    )
    drop_source_tables: bool = Field(
        default=False, description="At finalize, drop the moved tables on the source (their data is on the target)."
    )

    # The one place where an absent sub-spec takes its defaults.
    @property
    def lock_budget_or_default(self) -> LockBudget:
        return self.lock_budget or LockBudget()

    def secret_name_or_default(self, name: str) -> str:
        return self.secret_name or f"{name}-connection"


# The phases the controller sets; errors are conditions, not a phase.
SplitPhase = Literal["Preparing", "Copying", "Replicating", "CuttingOver", "CutOver", "RollingBack", "Finalized"]
SyncState = Literal["init", "copying", "copied", "syncing", "ready", "unknown"]


class TableSync(Model):
    """One moved table's replication state."""

    name: str = Field(max_length=200, description="schema.table.")
    state: SyncState = Field(description="init, copying (initial copy), copied, syncing, ready (streaming).")
    rows: int | None = Field(default=None, description="Estimated rows on the source.")


class CutoverReport(Model):
    """What the last cutover or rollback did."""

    direction: Literal["toTarget", "toSource"] = Field(description="Where writes went.")
    time: Timestamp = Field(description="When it committed.")
    write_block_ms: int = Field(description="How long writes to the moved tables were blocked.")
    lock_retries: int = Field(default=0, description="Attempts whose lock or catch-up did not succeed in time.")
    rows_verified: int = Field(default=0, description="Rows whose count and checksum matched on both sides.")


class DatabaseSplitStatus(BaseStatus):
    """Observed state of a DatabaseSplit."""

    phase: SplitPhase | None = Field(default=None, description="Where the split is.")
    writes_to: Literal["source", "target"] | None = Field(
        default=None, description="Which database takes the application's writes now."
    )
    tables: list[TableSync] = Field(
        default_factory=list, description="Per-table sync state.", json_schema_extra={"maxItems": 100}
    )
    lag_bytes: int | None = Field(default=None, description="WAL the subscriber has yet to confirm.")
    lag_seconds: float | None = Field(default=None, description="Age of the last change the subscriber confirmed.")
    copy_eta_seconds: int | None = Field(default=None, description="Estimated seconds left of the initial copy.")
    longest_write_block_ms: int | None = Field(
        default=None, description="Longest time writes were blocked by a cutover or rollback."
    )
    last_cutover: CutoverReport | None = Field(default=None, description="The last cutover or rollback.")
    connection_secret: str | None = Field(
        default=None, max_length=253, description="The application's connection Secret."
    )


INFO = KindInfo(
    kind="DatabaseSplit",
    plural="databasesplits",
    singular="databasesplit",
    short_names=["dbsplit", "pgsplit"],
    columns=[
        *READY_COLUMNS,
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Writes", type="string", json_path=".status.writesTo"),
        PrinterColumn(name="Lag", type="integer", json_path=".status.lagBytes"),
        PrinterColumn(name="Block-ms", type="integer", json_path=".status.longestWriteBlockMs"),
        PrinterColumn(name="ETA", type="integer", json_path=".status.copyEtaSeconds", priority=1),
        AGE_COLUMN,
    ],
)
