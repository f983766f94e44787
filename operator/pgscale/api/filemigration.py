"""FileMigration: move Base64/bytea files out of a table into object storage, verifiably."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .common import (
    AGE_COLUMN,
    READY_COLUMNS,
    BaseStatus,
    Identifier,
    JobTemplate,
    KindInfo,
    Model,
    ObjectName,
    PrinterColumn,
    ProfileReference,
    Quantity,
    TableReference,
    Timestamp,
    cel,
)

KEY_TOKENS = ("{table}", "{key}", "{schema}")
Phase = Literal["copy", "cutover", "dropSource"]


class S3CredentialsReference(Model):
    """A Secret holding S3 access keys."""

    name: ObjectName = Field(description="Name of the Secret in the same namespace.")
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID", max_length=253, description="Key holding the access key id."
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY", max_length=253, description="Key holding the secret access key."
    )


class S3Destination(Model):
    """An S3 bucket, or a bucket on MinIO or another S3-compatible store."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            (
                "!has(self.kmsKeyId) || (has(self.serverSideEncryption) && self.serverSideEncryption == 'aws:kms')",
                "kmsKeyId: needs serverSideEncryption aws:kms",
            ),
        )
    }

    bucket: str = Field(
        min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$", description="Bucket name."
    )
    prefix: str = Field(
        default="",
        max_length=512,
        pattern=r"^([A-Za-z0-9!_.*'()-]+/)*$",
        description="Key prefix ending in /, e.g. files/. Empty for the bucket root.",
    )
    region: str = Field(default="us-east-1", max_length=64, description="Region of the bucket.")
    endpoint: str | None = Field(
        default=None,
        max_length=512,
        pattern=r"^https?://[^\s]+$",
        description="Endpoint URL for MinIO and other S3-compatible stores, e.g. http://minio:9000.",
    )
    force_path_style: bool = Field(
        default=True, description="Address buckets by path (what most S3-compatible stores need)."
    )
    credentials_secret_ref: S3CredentialsReference | None = Field(
        default=None, description="Access keys; the pod's own AWS credentials when unset."
    )
    server_side_encryption: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="Server-side encryption of the objects."
    )
    kms_key_id: str | None = Field(default=None, max_length=2048, description="KMS key for aws:kms.")


class FilesystemDestination(Model):
    """A directory on a PersistentVolumeClaim."""

    claim_name: ObjectName = Field(description="PersistentVolumeClaim mounted into the job pod.")
    path: str = Field(
        default="",
        max_length=512,
        pattern=r"^([A-Za-z0-9_.-]+/)*$",
        description="Directory inside the volume, ending in / (no .. allowed). Empty for its root.",
        json_schema_extra=cel(("!self.contains('..')", "path: must not contain ..")),
    )


class Destination(Model):
    """Where the files go: exactly one of s3 or filesystem."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            ("has(self.s3) != has(self.filesystem)", "destination: set exactly one of s3 or filesystem"),
        )
    }

    s3: S3Destination | None = Field(default=None, description="An S3-compatible bucket.")
    filesystem: FilesystemDestination | None = Field(default=None, description="A volume.")


class SourceColumns(Model):
    """Optional columns that describe each file."""

    file_name: Identifier | None = Field(default=None, description="Column with the original file name.")
    content_type: Identifier | None = Field(default=None, description="Column with the MIME type.")
    size: Identifier | None = Field(
        default=None, description="Column with the size in bytes; a mismatch marks the row as failed."
    )


class RateLimit(Model):
    """Upper bounds on migration speed, to spare the database and the network."""

    rows_per_second: int | None = Field(default=None, ge=1, le=1000000, description="Rows per second.")
    bytes_per_second: Quantity | None = Field(default=None, description="Bytes per second, e.g. 50Mi.")


class FileMigrationSpec(Model):
    """Desired state of a FileMigration."""

    model_config = Model.model_config | {
        "json_schema_extra": cel(
            ("self.pathColumn != self.storageTypeColumn", "pathColumn and storageTypeColumn must differ"),
            (
                "self.dataColumn != self.pathColumn && self.dataColumn != self.storageTypeColumn",
                "dataColumn must differ from pathColumn and storageTypeColumn",
            ),
            ("self.keyColumn != self.dataColumn", "keyColumn and dataColumn must differ"),
        )
    }

    profile_ref: ProfileReference = Field(description="DatabaseProfile whose database holds the table.")
    table: TableReference = Field(
        description='Table holding the files ("File" in the strategy).',
        json_schema_extra=cel(("self == oldSelf", "table is immutable; create a new FileMigration")),
    )
    key_column: Identifier = Field(
        description="Unique, non-null key of each row (usually the primary key), e.g. id.",
        json_schema_extra=cel(("self == oldSelf", "keyColumn is immutable")),
    )
    data_column: Identifier = Field(
        description="Column holding the file contents, e.g. data.",
        json_schema_extra=cel(("self == oldSelf", "dataColumn is immutable")),
    )
    encoding: Literal["base64", "bytea"] = Field(
        description="base64: text column with Base64; bytea: binary column.",
        json_schema_extra=cel(("self == oldSelf", "encoding is immutable")),
    )
    columns: SourceColumns | None = Field(default=None, description="Optional describing columns.")
    destination: Destination = Field(
        description="Where the files go.",
        json_schema_extra=cel(("self == oldSelf", "destination is immutable; create a new FileMigration")),
    )
    key_template: str = Field(
        default="{table}/{key}",
        max_length=512,
        pattern=r"^[A-Za-z0-9_./{}-]+$",
        description="Object key under the prefix, from the row's key; tokens {schema} {table} {key}.",
        json_schema_extra=cel(
            ("self.contains('{key}')", "keyTemplate: must contain {key} so every row has its own object"),
            ("self == oldSelf", "keyTemplate is immutable"),
        ),
    )
    path_column: Identifier = Field(
        default="filePath",
        description="Column that receives the object's path.",
        json_schema_extra=cel(("self == oldSelf", "pathColumn is immutable")),
    )
    storage_type_column: Identifier = Field(
        default="storageType",
        description="Column that says where the file lives.",
        json_schema_extra=cel(("self == oldSelf", "storageTypeColumn is immutable")),
    )
    phase: Phase = Field(
        default="copy",
        description=(
            "The furthest phase allowed: copy (objects written and verified, rows keep their data), "
            "cutover (rows point at objects), dropSource (data nulled, then the column dropped)."
        ),
    )
    drop_column: bool = Field(
        default=True,
        description="In dropSource, drop the data column after a full verification pass.",
    )
    batch_size: int = Field(default=100, ge=1, le=10000, description="Rows claimed per batch.")
    concurrency: int = Field(default=4, ge=1, le=64, description="Uploads in flight at once.")
    rate_limit: RateLimit | None = Field(default=None, description="Speed limits.")
    multipart_threshold: Quantity = Field(default="8Mi", description="Files at least this large are uploaded in parts.")
    multipart_chunk_size: Quantity = Field(default="8Mi", description="Part size of multipart uploads (>= 5Mi).")
    suspend: bool = Field(default=False, description="Pause the migration; a running Job stops after its batch.")
    job: JobTemplate | None = Field(default=None, description="How the migration Job's pod runs.")


class FailedRow(Model):
    """A row that could not be migrated, and why."""

    key: str = Field(max_length=1024, description="The row's key.")
    reason: str = Field(max_length=1024, description="Why it was skipped.")


# The phases the controller sets (controllers/filemigration.py); errors are conditions, not a phase.
MigrationPhase = Literal["Copying", "Verifying", "CuttingOver", "DroppingSource", "Completed"]


class FileMigrationStatus(BaseStatus):
    """Observed state of a FileMigration."""

    phase: MigrationPhase | None = Field(default=None, description="Where the migration is.")
    progress: str | None = Field(
        default=None, max_length=64, description="Migrated rows as a percentage, for kubectl get."
    )
    rows_total: int | None = Field(default=None, description="Rows with data to migrate.")
    rows_migrated: int | None = Field(default=None, description="Rows whose object is written and verified.")
    rows_failed: int | None = Field(default=None, description="Rows skipped as malformed.")
    rows_remaining: int | None = Field(default=None, description="Rows still to do.")
    bytes_migrated: int | None = Field(default=None, description="Bytes written to the destination.")
    bytes_per_second: float | None = Field(default=None, description="Recent throughput.")
    rows_per_second: float | None = Field(default=None, description="Recent row rate.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds left.")
    failed_rows: list[FailedRow] = Field(
        default_factory=list,
        description="Some skipped rows; all are in the ledger table.",
        json_schema_extra={"maxItems": 20},
    )
    job_name: str | None = Field(default=None, max_length=253, description="The running or last Job.")
    reclaimable_bytes: int | None = Field(
        default=None, description="Space VACUUM can reuse after nulling the data (VACUUM FULL returns it)."
    )
    started_at: Timestamp | None = Field(default=None, description="When the migration started.")
    completed_at: Timestamp | None = Field(default=None, description="When it reached its phase.")


INFO = KindInfo(
    kind="FileMigration",
    plural="filemigrations",
    singular="filemigration",
    short_names=["fm", "pgfiles"],
    columns=[
        *READY_COLUMNS,
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Progress", type="string", json_path=".status.progress"),
        PrinterColumn(name="Migrated", type="integer", json_path=".status.rowsMigrated"),
        PrinterColumn(name="Failed", type="integer", json_path=".status.rowsFailed"),
        PrinterColumn(name="ETA", type="integer", json_path=".status.etaSeconds", priority=1),
        AGE_COLUMN,
    ],
)
