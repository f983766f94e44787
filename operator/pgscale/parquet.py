"""Rows as Parquet files and back (pure; pyarrow): the type mapping, the file, its manifest, its key.

Every PostgreSQL type maps to the Arrow type that holds its values exactly, or to its
PostgreSQL text form (``col::text``), which PostgreSQL parses back to the same value on
restore. The fallback (text) covers numeric without a declared precision (and precision
over 76), json/jsonb (their text, as PostgreSQL prints it), interval, time with time zone,
ranges, network, geometric, bit, money, xml, composite and domain types, and arrays of
any of them (and of uuid). Files name each column's PostgreSQL type in the field metadata
(``pgscale.type``), so a restore, or a reader, knows what the text means.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from .pg.export import PgColumn as PgColumn  # defined with its query: the operator imports it without pyarrow

FORMAT = "pgscale-export/1"
TYPE_META = b"pgscale.type"


class ExportError(ValueError):
    """A value the file cannot hold as its column's type says; the batch is not exported."""


@dataclass(frozen=True)
class Mapped:
    """How one column goes into a file."""

    column: PgColumn
    arrow: pa.DataType
    as_text: bool  # read as PostgreSQL's text form (::text, or ::text[] for arrays)

    @property
    def name(self) -> str:
        return self.column.name


_SCALARS: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int2": pa.int16(),
    "int4": pa.int32(),
    "int8": pa.int64(),
    "float4": pa.float32(),
    "float8": pa.float64(),
    "text": pa.string(),
    "varchar": pa.string(),
    "bpchar": pa.string(),
    "name": pa.string(),
    "citext": pa.string(),
    "bytea": pa.binary(),
    "uuid": pa.uuid(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "time": pa.time64("us"),
}
_TEXT_FORMS = {"json", "jsonb"}  # kept as their text: a string column


def numeric_precision(typmod: int) -> tuple[int, int] | None:
    """(precision, scale) of numeric(p, s), or None when undeclared (PostgreSQL 15+ scales may be negative)."""
    if typmod < 4:
        return None
    value = typmod - 4
    return (value >> 16) & 0xFFFF, ((value & 0x7FF) ^ 1024) - 1024


def _scalar(column: PgColumn) -> tuple[pa.DataType, bool] | None:
    """(arrow type, read as text) of a non-array column's values; None: fall back to text."""
    if column.typtype == "e":
        return pa.string(), True
    if column.typtype != "b":
        return None
    if column.typname in _TEXT_FORMS:
        return pa.string(), True
    if column.typname == "numeric":
        ps = numeric_precision(column.typmod)
        if ps is None or not 0 <= ps[1] <= ps[0]:
            return None
        if ps[0] <= 38:
            return pa.decimal128(*ps), False
        if ps[0] <= 76:
            return pa.decimal256(*ps), False
        return None
    found = _SCALARS.get(column.typname)
    return (found, False) if found is not None else None


def arrow_type(column: PgColumn) -> Mapped:
    """The Arrow type of a column (see the module's docstring for the fallback)."""
    scalar = _scalar(column)
    if scalar is None:
        return Mapped(column, pa.list_(pa.string()) if column.array else pa.string(), True)
    kind, as_text = scalar
    if column.array:
        if kind == pa.uuid():  # pyarrow builds no lists of its uuid extension type: their text
            return Mapped(column, pa.list_(pa.string()), True)
        return Mapped(column, pa.list_(kind), as_text)
    if column.typtype == "e":
        return Mapped(column, pa.dictionary(pa.int32(), pa.string()), True)
    return Mapped(column, kind, as_text)


def fingerprint(mapped: Sequence[Mapped]) -> str:
    """Of the columns' names and PostgreSQL types: files of one fingerprint share one layout."""
    text = json.dumps([[m.name, m.column.type] for m in mapped])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _uuid_bytes(value: Any) -> Any:
    return value.bytes if isinstance(value, uuid.UUID) else value


def _converter(kind: pa.DataType) -> Callable[[Sequence[Any]], Sequence[Any]] | None:
    if kind == pa.uuid():
        return lambda values: [_uuid_bytes(v) for v in values]
    return None


def to_table(mapped: Sequence[Mapped], rows: Sequence[Sequence[Any]], metadata: dict[str, str]) -> pa.Table:
    """The rows (tuples in the columns' order, as psycopg returns them) as a table."""
    arrays = []
    fields = []
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in mapped]
    for m, values in zip(mapped, columns, strict=True):
        convert = _converter(m.arrow)
        data = convert(values) if convert else values
        try:
            if pa.types.is_dictionary(m.arrow):
                array = pa.array(data, type=pa.string()).dictionary_encode()
            else:
                array = pa.array(data, type=m.arrow)
        except (pa.ArrowException, OverflowError, ValueError, TypeError) as exc:
            raise ExportError(
                f"column {m.name!r} ({m.column.type}) holds a value Parquet's {m.arrow} cannot hold: {exc}"
            ) from exc
        arrays.append(array)
        fields.append(pa.field(m.name, array.type, metadata={TYPE_META: m.column.type.encode()}))
    schema = pa.schema(fields, metadata={f"pgscale.{k}": v for k, v in metadata.items()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write(table: pa.Table) -> bytes:
    """The Parquet file (zstd). The same rows always give the same bytes (no time in the file)."""
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd", row_group_size=64 * 1024)
    return out.getvalue()


def read(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def row_count(data: bytes) -> int:
    """Rows of a file, from its footer."""
    return int(pq.read_metadata(io.BytesIO(data)).num_rows)


def records(table: pa.Table, names: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """The rows of ``names`` as Python values psycopg writes back (decimals, aware datetimes, bytes, lists)."""
    for batch in table.select(list(names)).to_batches(max_chunksize=10000):
        columns = [col.to_pylist() for col in batch.columns]
        yield from zip(*columns, strict=True)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(**fields: Any) -> bytes:
    """The manifest beside a file: what it holds and how to check it (JSON)."""
    return (json.dumps({"format": FORMAT, **fields}, indent=1, sort_keys=True, default=str) + "\n").encode()


def _segment(name: str) -> str:
    """A name as one key segment: URL-quoted, with '.' quoted too (it separates schema and table)."""
    return quote(name, safe="-_~").replace(".", "%2E")


def table_dir(schema: str, table: str) -> str:
    return f"{_segment(schema)}.{_segment(table)}"


def file_key(schema: str, table: str, group: str, stem: str) -> str:
    """``<schema>.<table>/<group>/<stem>.parquet``: group is the cutoff's date or ``partition-<name>``."""
    return f"{table_dir(schema, table)}/{group}/{stem}.parquet"


def manifest_key(key: str) -> str:
    return key.removesuffix(".parquet") + ".manifest.json"


def partition_group(name: str) -> str:
    return f"partition-{_segment(name)}"
