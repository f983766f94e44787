"""The pure parts of RetentionPolicy's action export: the type mapping, files and keys, batch sizing,
storage failures as spec fields, the job pod's destination, and the spec's rules."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from pydantic import ValidationError

from pgscale import parquet
from pgscale.api.filemigration import Destination
from pgscale.api.retentionpolicy import RetentionPolicySpec
from pgscale.parquet import PgColumn
from pgscale.retention import next_export_pages
from pgscale.specs import builders
from pgscale.storage import FilesystemStore, problem


def col(name: str, typname: str, *, typtype: str = "b", typmod: int = -1, array: bool = False) -> PgColumn:
    return PgColumn(name, typname + ("[]" if array else ""), typname, typtype, typmod, array)


def numeric(p: int, s: int) -> int:
    return ((p << 16) | (s & 0x7FF)) + 4


@pytest.mark.parametrize(
    ("column", "arrow", "as_text"),
    [
        (col("a", "int8"), pa.int64(), False),
        (col("a", "timestamptz"), pa.timestamp("us", tz="UTC"), False),
        (col("a", "timestamp"), pa.timestamp("us"), False),
        (col("a", "numeric", typmod=numeric(12, 2)), pa.decimal128(12, 2), False),
        (col("a", "numeric", typmod=numeric(60, 10)), pa.decimal256(60, 10), False),
        (col("a", "numeric"), pa.string(), True),  # no declared precision: its text
        (col("a", "numeric", typmod=numeric(5, -2)), pa.string(), True),  # negative scale (PostgreSQL 15+)
        (col("a", "jsonb"), pa.string(), True),
        (col("a", "Mood", typtype="e"), pa.dictionary(pa.int32(), pa.string()), True),
        (col("a", "Mood", typtype="e", array=True), pa.list_(pa.string()), True),
        (col("a", "int4", array=True), pa.list_(pa.int32()), False),
        (col("a", "uuid"), pa.uuid(), False),
        (col("a", "uuid", array=True), pa.list_(pa.string()), True),
        (col("a", "bytea"), pa.binary(), False),
        (col("a", "interval"), pa.string(), True),
        (col("a", "inet"), pa.string(), True),
        (col("a", "email", typtype="d"), pa.string(), True),  # a domain: its text
        (col("a", "tstzrange", typtype="r", array=True), pa.list_(pa.string()), True),
    ],
)
def test_type_mapping(column: PgColumn, arrow: pa.DataType, as_text: bool) -> None:
    mapped = parquet.arrow_type(column)
    assert (mapped.arrow, mapped.as_text) == (arrow, as_text)


def test_numeric_precision_reads_typmod() -> None:
    assert parquet.numeric_precision(numeric(12, 2)) == (12, 2)
    assert parquet.numeric_precision(numeric(5, -2)) == (5, -2)
    assert parquet.numeric_precision(-1) is None


def test_a_file_holds_the_values_and_the_same_rows_give_the_same_bytes() -> None:
    columns = [
        col("id", "text"),
        col("mood", "Mood", typtype="e"),
        col("at", "timestamptz"),
        col("naive", "timestamp"),
        col("price", "numeric", typmod=numeric(12, 3)),
        col("tags", "text", array=True),
        col("blob", "bytea"),
        col("ident", "uuid"),
        col("day", "date"),
        col("clock", "time"),
    ]
    mapped = [parquet.arrow_type(c) for c in columns]
    u = uuid.uuid4()
    rows: list[tuple[Any, ...]] = [
        (
            "k1",
            "calm",
            datetime(2024, 1, 1, 12, tzinfo=UTC),
            datetime(2024, 1, 1, 12),
            Decimal("1.250"),
            ["a", None],
            b"\x00\xff",
            u,
            date(2024, 2, 29),
            time(13, 14, 15, 161718),
        ),
        ("k2", None, None, None, None, None, None, None, None, None),
    ]
    table = parquet.to_table(mapped, rows, {"source": "s.t"})
    data = parquet.write(table)
    assert data == parquet.write(parquet.to_table(mapped, rows, {"source": "s.t"}))
    assert parquet.row_count(data) == 2
    back = list(parquet.records(parquet.read(data), [c.name for c in columns]))
    assert back == rows
    field = parquet.read(data).schema.field("price")
    assert field.metadata[parquet.TYPE_META] == b"numeric"


def test_a_value_the_type_cannot_hold_names_the_column() -> None:
    mapped = [parquet.arrow_type(col("price", "numeric", typmod=numeric(5, 2)))]
    with pytest.raises(parquet.ExportError, match="'price'"):
        parquet.to_table(mapped, [(Decimal("NaN"),)], {})


def test_keys_quote_names_and_keep_schema_and_table_apart() -> None:
    assert parquet.table_dir("app data", 'Job "log"') == "app%20data.Job%20%22log%22"
    assert parquet.table_dir("a.b", "c") != parquet.table_dir("a", "b.c")
    key = parquet.file_key("public", "Task", "2026-09-04", "part-00000001-abcd")
    assert key == "public.Task/2026-09-04/part-00000001-abcd.parquet"
    assert parquet.manifest_key(key) == "public.Task/2026-09-04/part-00000001-abcd.manifest.json"


def test_export_batches_aim_at_rows_per_file() -> None:
    assert next_export_pages(10, 0, 1000, 80) == 20  # nothing matched: look further
    assert next_export_pages(40, 0, 1000, 80) == 80  # never past the largest
    assert next_export_pages(10, 500, 1000, 80) == 20
    assert next_export_pages(10, 100, 1000, 80) == 40  # at most 4x at once
    assert next_export_pages(10, 5000, 1000, 80) == 2  # shrink at once
    assert next_export_pages(1, 5000, 1000, 80) == 1


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")


S3 = Destination.model_validate({"s3": {"bucket": "cold", "endpoint": "http://s3:9000"}})


@pytest.mark.parametrize(
    ("exc", "field", "reason"),
    [
        (
            EndpointConnectionError(endpoint_url="http://s3:9000"),
            "export.destination.s3.endpoint",
            "DestinationUnreachable",
        ),
        (client_error("NoSuchBucket"), "export.destination.s3.bucket", "BucketNotFound"),
        (client_error("InvalidAccessKeyId"), "export.destination.s3.credentialsSecretRef", "CredentialsRejected"),
        (client_error("SignatureDoesNotMatch"), "export.destination.s3.credentialsSecretRef", "CredentialsRejected"),
        (client_error("AccessDenied"), "export.destination.s3.credentialsSecretRef", "DestinationNotWritable"),
    ],
)
def test_storage_failures_name_the_field(exc: Exception, field: str, reason: str) -> None:
    found = problem(exc, S3, "export.destination")
    assert found is not None and found[:2] == (field, reason)
    assert "cold" in found[2]


def test_unknown_storage_failures_are_not_guessed() -> None:
    assert problem(client_error("SlowDown"), S3, "export.destination") is None
    volume = Destination.model_validate({"filesystem": {"claimName": "cold"}})
    found = problem(PermissionError(13, "Permission denied"), volume, "export.destination")
    assert found is not None and found[0] == "export.destination.filesystem.claimName"


def test_the_job_pod_gets_the_keys_or_the_volume() -> None:
    s3 = Destination.model_validate({"s3": {"bucket": "cold", "credentialsSecretRef": {"name": "keys"}}})
    env, volumes = builders.destination_env(s3)
    assert [e["name"] for e in env] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] and volumes == []
    assert env[1]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "AWS_SECRET_ACCESS_KEY"}
    env, volumes = builders.destination_env(Destination.model_validate({"filesystem": {"claimName": "cold"}}))
    assert env == [] and volumes[0][0]["persistentVolumeClaim"] == {"claimName": "cold"}
    assert volumes[0][1]["mountPath"] == "/data"


def test_filesystem_store_location_of_its_root(tmp_path: Any) -> None:
    assert FilesystemStore(tmp_path).location("") == str(tmp_path)


BASE = {
    "profileRef": {"name": "app"},
    "table": {"name": "Task"},
    "ageColumn": "completedAt",
    "olderThan": "90d",
}


def test_export_spec_defaults_and_children() -> None:
    spec = RetentionPolicySpec.model_validate(
        {
            **BASE,
            "action": "export",
            "export": {"destination": {"s3": {"bucket": "cold"}}},
            "children": {"mode": "archive"},
        }
    )
    assert spec.export_or_default.rows_per_file == 100000
    with pytest.raises(ValueError, match=r"spec\.export"):
        _ = RetentionPolicySpec.model_validate(BASE).export_or_default
    with pytest.raises(ValidationError):
        RetentionPolicySpec.model_validate(
            {**BASE, "action": "export", "export": {"destination": {}, "rowsPerFile": 0}}
        )
