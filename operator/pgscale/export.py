"""Writing export files, shared by RetentionPolicy's batches (jobs/export.py) and whole partitions
(RetentionPolicy's partition-aware path and PartitionPolicy's ``retention.action: export``).

A file is written create-only and read back (SHA-256, size, and the row count in its footer)
before the rows it holds are deleted; an object already under its key belongs to a pending
batch (keys carry the batch id and a random token) and never holds the only copy of a row:
it is reused when identical, else replaced.

A whole partition is first detached (marked, like the other partition paths), then, in one
transaction holding it ``ACCESS EXCLUSIVE``, read through a server-side cursor into one
Parquet file spooled to a temporary file (memory stays at one chunk of rows however large
the partition), uploaded, read back, dropped, and recorded done in the ledger.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import IO, Any

import psycopg
import pyarrow.parquet as pq
from psycopg import sql

from . import faults, parquet
from .pg import export as sqle
from .pg import qualified
from .pg.retention import primary_key
from .storage import AlreadyExists, ObjectStore

log = logging.getLogger(__name__)

PARQUET_TYPE = "application/vnd.apache.parquet"
CHUNK = 8 * 1024 * 1024
CURSOR_ROWS = 10000


class VerificationError(RuntimeError):
    """A file read back differs from what was written; its rows stay in the database."""


@dataclass
class ExportCounts:
    """What exporting did (added to a run's report)."""

    files: int = 0
    bytes: int = 0
    reused: int = 0
    redone: int = 0


def jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, int | float | str | bool) else str(value)


def instant(value: Any) -> datetime | None:
    """An ageColumn value as an instant (timestamps without time zone and dates are read as UTC)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return None


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(CHUNK):
        yield chunk


def place(
    store: ObjectStore,
    key: str,
    data: bytes | IO[bytes],
    *,
    size: int,
    sha: str,
    rows: int | None,
    content_type: str,
    counts: ExportCounts,
) -> None:
    """Write an object create-only and read it back (see the module's docstring)."""

    def body() -> Iterator[bytes]:
        if isinstance(data, bytes):
            yield data
        else:
            yield from _chunks(data)

    try:
        store.put_new(key, body(), size=size, sha256=sha, content_type=content_type)
        counts.bytes += size
    except AlreadyExists:
        found = store.head(key)
        if found is not None and found.sha256 == sha and found.size == size:
            counts.reused += 1
        else:
            store.delete(key)
            store.put_new(key, body(), size=size, sha256=sha, content_type=content_type)
            counts.bytes += size
    faults.checkpoint("export-object-written")
    with tempfile.TemporaryFile() as back:
        digest, got = hashlib.sha256(), 0
        for chunk in _iter_fetch(store, key, back):
            digest.update(chunk)
            got += len(chunk)
        if digest.hexdigest() != sha or got != size:
            raise VerificationError(
                f"{store.location(key)} reads back as {got} bytes with sha256 {digest.hexdigest()}, not {size} "
                f"bytes with {sha}; no row was deleted"
            )
        if rows is not None:
            back.seek(0)
            found_rows = int(pq.read_metadata(back).num_rows)
            if found_rows != rows:
                raise VerificationError(
                    f"{store.location(key)} reads back with {found_rows} rows, not {rows}; no row was deleted"
                )


def _iter_fetch(store: ObjectStore, key: str, into: IO[bytes]) -> Iterator[bytes]:
    """The object's bytes, also written into ``into`` (streamed: files of whole partitions are large)."""
    for chunk in store.stream(key):
        into.write(chunk)
        yield chunk


def clear(store: ObjectStore, pending: sqle.PendingBatch, written: set[str]) -> None:
    """Objects under a pending batch's keys that this attempt does not write: an earlier attempt's,
    holding copies of rows still in the database."""
    for schema, table in pending.tables:
        key = parquet.file_key(schema, table, pending.group, pending.stem)
        if key in written:
            continue
        for name in (key, parquet.manifest_key(key)):
            if store.head(name) is not None:
                store.delete(name)
    faults.checkpoint("export-cleared")


def write_manifest(
    store: ObjectStore, record: sqle.FileRecord, *, policy: str, batch: int, columns: list[Any], counts: ExportCounts
) -> None:
    """The manifest beside a file, written and read back like the file."""
    note = parquet.manifest(
        file=record.object_key.rsplit("/", 1)[-1],
        sha256=record.sha256,
        bytes=record.bytes,
        rows=record.rows,
        source={"schema": record.source_schema, "table": record.source_table, "partition": record.partition_name},
        policy=policy,
        batch=batch,
        cutoff=record.cutoff.isoformat() if record.cutoff else None,
        key={"columns": record.key_columns, "min": record.key_min, "max": record.key_max},
        age={"column": record.age_column, "min": record.age_min, "max": record.age_max} if record.age_column else None,
        schema={"fingerprint": record.fingerprint, "columns": columns},
        rowBytes=record.row_bytes,
    )
    place(
        store,
        record.manifest_key,
        note,
        size=len(note),
        sha=parquet.sha256(note),
        rows=None,
        content_type="application/json",
        counts=counts,
    )


def export_partition(
    conn: psycopg.Connection,
    store: ObjectStore,
    *,
    state_schema: str,
    policy: str,
    source: tuple[str, str],
    part: tuple[str, str],
    age_column: str,
    destination: dict[str, Any],
    run_id: int | None = None,
    counts: ExportCounts,
) -> int:
    """Export a detached partition whole into one verified file, then drop it (one transaction with
    the ledger); returns its rows. A pending batch of this partition (a killed attempt) is redone
    under its own key."""
    sqle.ensure_ledger(conn, state_schema)
    pending = next((p for p in sqle.pending_batches(conn, state_schema, policy) if p.partition == part), None)
    retried = pending is not None
    if pending is None:
        pending = sqle.begin_batch(
            conn,
            state_schema,
            policy=policy,
            group=parquet.partition_group(part[1]),
            tables=[source],
            run_id=run_id,
            partition=part,
        )
    faults.checkpoint("export-partition-pending")
    mapped = [parquet.arrow_type(c) for c in sqle.columns(conn, *part)]
    names = [m.name for m in mapped]
    keys = primary_key(conn, *part)
    table = qualified(*part)
    key = parquet.file_key(source[0], source[1], pending.group, pending.stem)
    with conn.transaction():
        conn.execute("SELECT set_config('statement_timeout', '0', true)")  # a whole partition: no batch limit
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (table.as_string(conn),)).fetchone()
        row_bytes = int(row[0]) if row else 0
        order = sql.SQL(", ").join(sql.Identifier(k) for k in keys) if keys else sql.SQL("ctid")
        select = sql.SQL("SELECT {} FROM {} s ORDER BY {}").format(
            sql.SQL(", ").join(sqle._expr("s", m) for m in mapped), table, order
        )
        meta = {"source": f"{source[0]}.{source[1]}", "partition": part[1], "batch": str(pending.id)}
        rows = 0
        first: tuple[Any, ...] | None = None
        last: tuple[Any, ...] | None = None
        ages: list[datetime] = []
        with tempfile.TemporaryFile() as spool:
            writer: pq.ParquetWriter | None = None
            with conn.cursor(name="pgscale_export_partition") as cur:
                cur.execute(select)
                while batch := cur.fetchmany(CURSOR_ROWS):
                    chunk = parquet.to_table(mapped, batch, meta)
                    if writer is None:
                        writer = pq.ParquetWriter(spool, chunk.schema, compression="zstd")
                    writer.write_table(chunk, row_group_size=64 * 1024)
                    rows += len(batch)
                    first = first or batch[0]
                    last = batch[-1]
                    if age_column in names:
                        i = names.index(age_column)
                        found = [a for a in (instant(r[i]) for r in batch) if a is not None]
                        if found:
                            ages = [min([*ages, *found]), max([*ages, *found])]
            if writer is None:  # an empty partition: no file
                if retried:
                    clear(store, pending, set())
                conn.execute(sql.SQL("DROP TABLE {}").format(table))
                sqle.forget_batch(conn, state_schema, pending.id)
                return 0
            writer.close()
            size = spool.seek(0, 2)
            digest = hashlib.sha256()
            for chunk_bytes in _chunks(spool):
                digest.update(chunk_bytes)
            sha = digest.hexdigest()
            idx = [names.index(k) for k in keys]
            record = sqle.FileRecord(
                source_schema=source[0],
                source_table=source[1],
                root=True,
                object_key=key,
                manifest_key=parquet.manifest_key(key),
                location=store.location(key),
                destination=destination,
                rows=rows,
                bytes=size,
                sha256=sha,
                fingerprint=parquet.fingerprint(mapped),
                row_bytes=row_bytes,
                key_columns=keys,
                key_min=[jsonable(first[i]) for i in idx] if first and keys else None,
                key_max=[jsonable(last[i]) for i in idx] if last and keys else None,
                age_column=age_column,
                age_min=ages[0] if ages else None,
                age_max=ages[1] if ages else None,
                partition_name=part[1],
            )
            place(store, key, spool, size=size, sha=sha, rows=rows, content_type=PARQUET_TYPE, counts=counts)
        faults.checkpoint("export-partition-written")
        columns = [[m.name, m.column.type, str(m.arrow)] for m in mapped]
        write_manifest(store, record, policy=policy, batch=pending.id, columns=columns, counts=counts)
        faults.checkpoint("export-partition-verified")
        conn.execute(sql.SQL("DROP TABLE {}").format(table))
        faults.checkpoint("export-partition-dropped")
        sqle.finish_batch(
            conn, state_schema, batch_id=pending.id, policy=policy, files=[record], run_id=run_id, counts={}
        )
        faults.checkpoint("export-partition-recorded")
    faults.checkpoint("export-partition-committed")
    sqle.fold_after_commit(conn, state_schema)
    counts.files += 1
    return rows


def partition_policy_key(namespace: str, name: str) -> str:
    """How a PartitionPolicy's exports are named in the ledger (a RetentionPolicy's: ``namespace/name``)."""
    return f"partitionpolicy:{namespace}/{name}"


def partition_exporter(
    conn: psycopg.Connection,
    store: ObjectStore,
    *,
    state_schema: str,
    policy: str,
    source: tuple[str, str],
    age_column: str,
    destination: dict[str, Any],
    counts: ExportCounts | None = None,
) -> Callable[[str, str], int]:
    """PartitionPolicy maintenance's ``export``: a detached partition (schema, name) into its file, dropped."""
    tally = counts or ExportCounts()

    def export(schema: str, name: str) -> int:
        return export_partition(
            conn,
            store,
            state_schema=state_schema,
            policy=policy,
            source=source,
            part=(schema, name),
            age_column=age_column,
            destination=destination,
            counts=tally,
        )

    return export
