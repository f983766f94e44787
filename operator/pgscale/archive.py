"""`pgscale archive list` and `pgscale archive restore`: what action export wrote, and bringing it back.

A restore takes whole batches (the policy's file and its children's files, parents first) in
one transaction each: every file is read back and its SHA-256 compared with the ledger
before a row is inserted, and rows go in with ``ON CONFLICT DO NOTHING``, so restoring
twice inserts nothing twice (rows whose key is already there are counted as skipped).
Into the original tables, or into tables of the same names in another schema (created
like the originals, with their primary keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import groupby
from typing import Any

import psycopg
from psycopg import sql

from . import parquet
from .api.filemigration import Destination
from .pg import export as sqle
from .pg import qualified, table_columns
from .pg.retention import create_like, primary_key
from .storage import ObjectStore

StoreFor = Callable[[Destination], ObjectStore]


@dataclass
class RestoreReport:
    """What a restore did (printed as JSON by the CLI)."""

    batches: int = 0
    files: int = 0
    inserted: int = 0
    skipped: int = 0  # rows whose key was already in the table
    tables: dict[str, int] = field(default_factory=dict)  # rows inserted per table


def select(
    conn: psycopg.Connection,
    state_schema: str,
    *,
    policy: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    partition: str | None = None,
) -> list[dict[str, Any]]:
    """The ledger's files: every batch whose policy file's ageColumn range meets [since, until), or
    that exported ``partition``, with its children's files."""
    return sqle.list_files(conn, state_schema, policy=policy, since=since, until=until, partition=partition)


def restore(
    conn: psycopg.Connection,
    state_schema: str,
    files: Iterable[dict[str, Any]],
    store_for: StoreFor,
    *,
    into_schema: str | None = None,
) -> RestoreReport:
    """Insert the rows of these files back, batch by batch (see the module's docstring)."""
    report = RestoreReport()
    stores: dict[str, ObjectStore] = {}
    waiting = [list(batch) for _, batch in groupby(files, key=lambda f: f["batch_id"])]
    while waiting:
        # A batch whose rows' parents are in a later batch (a table that references itself: a row
        # exported before its parent, on an earlier page) waits for the others; none restored: the error.
        later: list[list[dict[str, Any]]] = []
        refused: psycopg.errors.ForeignKeyViolation | None = None
        for batch in waiting:
            done = RestoreReport()
            try:
                with conn.transaction():
                    for item in batch:
                        destination = Destination.model_validate(item["destination"])
                        name = destination.model_dump_json()
                        store = stores.get(name) or stores.setdefault(name, store_for(destination))
                        inserted, skipped = _restore_file(conn, state_schema, item, store, into_schema)
                        done.files += 1
                        done.inserted += inserted
                        done.skipped += skipped
                        where = f"{into_schema or item['source_schema']}.{item['source_table']}"
                        done.tables[where] = done.tables.get(where, 0) + inserted
            except psycopg.errors.ForeignKeyViolation as exc:
                later.append(batch)
                refused = exc
                continue
            report.files += done.files
            report.inserted += done.inserted
            report.skipped += done.skipped
            for where, n in done.tables.items():
                report.tables[where] = report.tables.get(where, 0) + n
            report.batches += 1
        if len(later) == len(waiting):
            assert refused is not None
            raise refused
        waiting = later
    return report


def _restore_file(
    conn: psycopg.Connection, state_schema: str, item: dict[str, Any], store: ObjectStore, into_schema: str | None
) -> tuple[int, int]:
    key = item["object_key"]
    data = store.fetch(key)
    if parquet.sha256(data) != item["sha256"] or len(data) != item["bytes"]:
        raise RuntimeError(
            f"{store.location(key)} reads back as {len(data)} bytes with sha256 {parquet.sha256(data)}, not "
            f"{item['bytes']} bytes with {item['sha256']} as recorded: not restored"
        )
    table = parquet.read(data)
    source = (item["source_schema"], item["source_table"])
    target = (into_schema, source[1]) if into_schema else source
    if into_schema and table_columns(conn, *target) is None:
        create_like(conn, source, target)
    columns = {c.name: c for c in sqle.columns(conn, *target)}
    if not columns:
        raise RuntimeError(f'table "{target[0]}"."{target[1]}" does not exist: not restored')
    missing = [n for n in table.column_names if n not in columns]
    if missing:
        raise RuntimeError(
            f'table "{target[0]}"."{target[1]}" has no column {", ".join(map(repr, missing))} that '
            f"{store.location(key)} holds: add it, or restore into another schema"
        )
    if not primary_key(conn, *target):
        raise RuntimeError(
            f'table "{target[0]}"."{target[1]}" has no primary key, so a second restore could not tell its rows '
            "from restored ones: restore into another schema (--into-schema), which gets the original's key"
        )
    names = [n for n in table.column_names if not columns[n].generated]
    conn.execute(
        sql.SQL("CREATE TEMP TABLE pgscale_restore ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
            sql.SQL(", ").join(sql.Identifier(n) for n in names), qualified(*target)
        )
    )
    cols = sql.SQL(", ").join(sql.Identifier(n) for n in names)
    with conn.cursor().copy(sql.SQL("COPY pgscale_restore ({}) FROM STDIN").format(cols)) as copy:
        for record in parquet.records(table, names):
            copy.write_row(record)
    inserted = conn.execute(
        sql.SQL(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM pgscale_restore ON CONFLICT DO NOTHING"
        ).format(qualified(*target), cols, cols)
    ).rowcount
    conn.execute("DROP TABLE pgscale_restore")
    sqle.mark_restored(conn, state_schema, int(item["id"]), f"{target[0]}.{target[1]}")
    return inserted, table.num_rows - inserted


# --- the CLI ---------------------------------------------------------------------------------


def _store_for(namespace: str) -> StoreFor:
    """Stores with the access keys of the destination's Secret (read through the kubeconfig), else the
    environment's; a volume under $PGSCALE_FS_ROOT (default /data)."""
    from .kube import Kube
    from .storage import open_store

    def store_for(destination: Destination) -> ObjectStore:
        env = dict(os.environ)
        s3 = destination.s3
        if s3 is not None and s3.credentials_secret_ref is not None:
            ref = s3.credentials_secret_ref
            secret = Kube().read_secret(namespace, ref.name) or {}
            env["AWS_ACCESS_KEY_ID"] = secret.get(ref.access_key_id_key, "")
            env["AWS_SECRET_ACCESS_KEY"] = secret.get(ref.secret_access_key_key, "")
        return open_store(destination, env)

    return store_for


def _row(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch": item["batch_id"],
        "table": f"{item['source_schema']}.{item['source_table']}",
        "rows": item["rows"],
        "bytes": item["bytes"],
        "ageMin": item["age_min"].isoformat() if item["age_min"] else None,
        "ageMax": item["age_max"].isoformat() if item["age_max"] else None,
        "keyMin": item["key_min"],
        "keyMax": item["key_max"],
        "partition": item["partition_name"],
        "location": item["location"],
        "sha256": item["sha256"],
        "restored": item["restored_at"].isoformat() if item["restored_at"] else None,
    }


def main(args: argparse.Namespace) -> int:
    """Entry point of `pgscale archive ...`."""
    from botocore.exceptions import BotoCoreError, ClientError

    from . import pg
    from .api import PARTITION_POLICY, RETENTION_POLICY
    from .errors import ReconcileError
    from .export import partition_policy_key
    from .jobs import from_api

    try:
        if args.partition_policy:
            job = from_api(PARTITION_POLICY, args.namespace, args.partition_policy)
            policy = partition_policy_key(args.namespace, args.partition_policy)
        else:
            job = from_api(RETENTION_POLICY, args.namespace, args.policy)
            policy = job.policy_key
    except ReconcileError as exc:
        print(f"pgscale archive: {exc.message}", file=sys.stderr)
        return 1
    if args.archive == "restore" and not (args.all or args.since or args.until or args.partition):
        print("pgscale archive restore: give --since/--until, --partition or --all", file=sys.stderr)
        return 2
    with pg.connect(job.conn) as conn:
        conn.execute("SELECT set_config('TimeZone', 'UTC', false)")
        files = select(
            conn, job.state_schema, policy=policy, since=args.since, until=args.until, partition=args.partition
        )
        if args.archive == "list":
            rows = [_row(f) for f in files]
            if args.output == "json":
                print(json.dumps(rows, indent=1))
            else:
                print(f"{'BATCH':>7} {'TABLE':<32} {'ROWS':>9} {'BYTES':>11} {'OLDEST':<26} {'NEWEST':<26} LOCATION")
                for r in rows:
                    print(
                        f"{r['batch']:>7} {r['table'][:32]:<32} {r['rows']:>9} {r['bytes']:>11} "
                        f"{(r['ageMin'] or '-')[:26]:<26} {(r['ageMax'] or '-')[:26]:<26} {r['location']}"
                        + (" (restored)" if r["restored"] else "")
                    )
                print(f"{len(rows)} files, {sum(r['rows'] for r in rows)} rows, {sum(r['bytes'] for r in rows)} bytes")
            return 0
        try:
            report = restore(conn, job.state_schema, files, _store_for(args.namespace), into_schema=args.into_schema)
        except (psycopg.Error, RuntimeError, OSError, BotoCoreError, ClientError) as exc:
            # The batch that failed was rolled back whole; earlier batches stay restored (a rerun skips them).
            print(f"pgscale archive restore: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
            return 1
    print(json.dumps(asdict(report)))
    return 0
