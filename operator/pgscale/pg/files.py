"""SQL of FileMigration: the ledger, row claims, chunked reads and pointer updates.

The ledger (<stateSchema>.file_ledger) holds one row per migrated table row: the
object it went to, its size and SHA-256, and the row's ``xmin`` when pgscale last
touched it. A row whose ``xmin`` differs from the ledger's was changed by the
application since, so it is a candidate again; nulling the data is only ever done
for a row whose ``xmin`` still matches (nobody changed it since its upload).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from . import ensure_state_table, qualified, table_columns

LEDGER = "file_ledger"


@dataclass(frozen=True)
class Source:
    """Where the files are, and where each row's pointer goes."""

    schema: str
    table: str
    key: str
    data: str
    path: str
    storage_type: str
    size: str | None = None
    file_name: str | None = None
    content_type: str | None = None

    @property
    def relation(self) -> sql.Composed:
        return qualified(self.schema, self.table)


@dataclass(frozen=True)
class Claimed:
    """A row locked for this transaction."""

    xmin: str
    length: int | None  # octet_length of the data, None when NULL
    size: Any
    content_type: str | None
    path: str | None
    data: Any = None  # the value itself when it is at most claim()'s `small` long


@dataclass(frozen=True)
class Entry:
    """A ledger row."""

    key: str
    object_key: str | None
    size: int | None
    sha256: str | None
    status: str
    row_xmin: str | None
    reason: str | None = None


def ensure_ledger(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(
        conn,
        state_schema,
        LEDGER,
        "migration text NOT NULL, key text NOT NULL, object_key text, size bigint, sha256 text, "
        "status text NOT NULL, reason text, row_xmin text, "
        "updated_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (migration, key)",
    )


def _ledger(state_schema: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(state_schema), sql.Identifier(LEDGER))


def ensure_pointer_columns(conn: psycopg.Connection, src: Source, lock_timeout_ms: int) -> list[str]:
    """Add the path and storage-type columns (the strategy's phase 1); returns those added."""
    existing = table_columns(conn, src.schema, src.table) or {}
    added = []
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        if src.path not in existing:
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} text").format(src.relation, sql.Identifier(src.path)))
            added.append(src.path)
        if src.storage_type not in existing:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN {} varchar(20) DEFAULT 'database'").format(
                    src.relation, sql.Identifier(src.storage_type)
                )
            )
            added.append(src.storage_type)
    return added


def _needing_work(src: Source, state_schema: str, cutover: bool) -> sql.Composed:
    """FROM ... WHERE of the rows with data that still need work (the one definition of it).

    A row needs work when the ledger has no entry for it, when the row changed since
    (xmin differs), or, at cutover, when its object is verified but not pointed at yet.
    Failed rows are retried only once they change. Takes the migration as parameter %s.
    """
    pending = sql.SQL(" OR (l.status = 'verified')") if cutover else sql.SQL("")
    return sql.SQL(
        "FROM {rel} t LEFT JOIN {ledger} l ON l.migration = %s AND l.key = t.{key}::text "
        "WHERE t.{data} IS NOT NULL AND (l.key IS NULL OR l.row_xmin IS DISTINCT FROM t.xmin::text{pending})"
    ).format(
        key=sql.Identifier(src.key),
        rel=src.relation,
        ledger=_ledger(state_schema),
        data=sql.Identifier(src.data),
        pending=pending,
    )


def candidates(
    conn: psycopg.Connection, src: Source, migration: str, state_schema: str, *, cutover: bool, batch: int
) -> Iterator[Any]:
    """Keys of rows that need work, streamed by a server-side cursor in key order."""
    query = sql.SQL("SELECT t.{} {} ORDER BY t.{}").format(
        sql.Identifier(src.key), _needing_work(src, state_schema, cutover), sql.Identifier(src.key)
    )
    with conn.transaction(), conn.cursor(name="pgscale_file_candidates") as cur:
        cur.itersize = batch
        cur.execute(query, (migration,))
        for row in cur:
            yield row[0]


def count_candidates(conn: psycopg.Connection, src: Source, migration: str, state_schema: str, *, cutover: bool) -> int:
    query = sql.SQL("SELECT count(*) {}").format(_needing_work(src, state_schema, cutover))
    row = conn.execute(query, (migration,)).fetchone()
    return int(row[0]) if row else 0


def claim(conn: psycopg.Connection, src: Source, key: Any, *, has_path: bool, small: int = 0) -> Claimed | None:
    """Lock one row (skipping it when the application or another worker holds it).

    With `small`, a value of at most that many bytes comes along (one round trip less per file).
    """
    cols = [
        sql.SQL("xmin::text"),
        sql.SQL("octet_length({})").format(sql.Identifier(src.data)),
        sql.Identifier(src.size) if src.size else sql.SQL("NULL"),
        sql.Identifier(src.content_type) if src.content_type else sql.SQL("NULL"),
        sql.Identifier(src.path) if has_path else sql.SQL("NULL"),
        sql.SQL("CASE WHEN octet_length({data}) <= %s THEN {data} END").format(data=sql.Identifier(src.data)),
    ]
    row = conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE {} = %s FOR UPDATE SKIP LOCKED").format(
            sql.SQL(", ").join(cols), src.relation, sql.Identifier(src.key)
        ),
        (small, key),
    ).fetchone()
    if row is None:
        return None
    return Claimed(xmin=row[0], length=row[1], size=row[2], content_type=row[3], path=row[4], data=row[5])


def claim_many(
    conn: psycopg.Connection,
    src: Source,
    keys: list[Any],
    *,
    has_path: bool,
    small: int,
    state_schema: str,
    migration: str,
) -> list[tuple[Any, Claimed, Entry | None]]:
    """Lock some rows (skipping those the application or another worker holds), in key order,
    each with its ledger entry and, when at most `small` bytes, its value: one round trip."""
    cols = [
        sql.SQL("t.{}").format(sql.Identifier(src.key)),
        sql.SQL("t.xmin::text"),
        sql.SQL("octet_length(t.{})").format(sql.Identifier(src.data)),
        sql.SQL("t.{}").format(sql.Identifier(src.size)) if src.size else sql.SQL("NULL"),
        sql.SQL("t.{}").format(sql.Identifier(src.content_type)) if src.content_type else sql.SQL("NULL"),
        sql.SQL("t.{}").format(sql.Identifier(src.path)) if has_path else sql.SQL("NULL"),
        sql.SQL("CASE WHEN octet_length(t.{data}) <= %s THEN t.{data} END").format(data=sql.Identifier(src.data)),
        sql.SQL("l.key, l.object_key, l.size, l.sha256, l.status, l.row_xmin"),
    ]
    rows = conn.execute(
        sql.SQL(
            "SELECT {cols} FROM {rel} t LEFT JOIN {ledger} l ON l.migration = %s AND l.key = t.{key}::text "
            "WHERE t.{key} = ANY(%s) ORDER BY t.{key} FOR UPDATE OF t SKIP LOCKED"
        ).format(
            cols=sql.SQL(", ").join(cols), rel=src.relation, ledger=_ledger(state_schema), key=sql.Identifier(src.key)
        ),
        (small, migration, keys),
    ).fetchall()
    return [
        (r[0], Claimed(r[1], r[2], r[3], r[4], r[5], r[6]), Entry(*r[7:13]) if r[7] is not None else None) for r in rows
    ]


def record_many(conn: psycopg.Connection, state_schema: str, migration: str, entries: list[Entry]) -> None:
    """Upsert ledger rows (in the caller's transaction), in one pipelined round trip."""
    if not entries:
        return
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} AS l (migration, key, object_key, size, sha256, status, reason, row_xmin) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (migration, key) DO UPDATE SET "
                "object_key = EXCLUDED.object_key, size = EXCLUDED.size, sha256 = EXCLUDED.sha256, "
                "status = EXCLUDED.status, reason = EXCLUDED.reason, row_xmin = EXCLUDED.row_xmin, "
                "updated_at = clock_timestamp()"
            ).format(_ledger(state_schema)),
            [(migration, e.key, e.object_key, e.size, e.sha256, e.status, e.reason, e.row_xmin) for e in entries],
        )


_cursors = itertools.count()


def read_chunks(conn: psycopg.Connection, src: Source, key: Any, chunk: int, *, text: bool) -> Iterator[bytes]:
    """The data column in slices of `chunk` bytes (a text column as its UTF-8 bytes): memory stays bounded.

    The server detoasts the value once and slices that copy. A `substring` query per slice
    would detoast the whole value again for each one (and count characters up to the slice
    in a text column): quadratic in the file's size. Must run inside a transaction.
    """
    value = sql.SQL("convert_to({}, 'UTF8')" if text else "{} || ''::bytea").format(sql.Identifier(src.data))
    query = sql.SQL(
        "SELECT substring(s.v FROM g FOR %(n)s) FROM (SELECT {value} AS v FROM {rel} WHERE {key} = %(k)s OFFSET 0) s, "
        "generate_series(1, octet_length(s.v), %(n)s) g"
    ).format(value=value, rel=src.relation, key=sql.Identifier(src.key))
    with conn.cursor(name=f"pgscale_file_data_{next(_cursors)}", binary=True) as cur:
        cur.itersize = 1
        cur.execute(query, {"n": chunk, "k": key})
        for row in cur:
            yield bytes(row[0])


def entry(conn: psycopg.Connection, state_schema: str, migration: str, key: str) -> Entry | None:
    row = conn.execute(
        sql.SQL(
            "SELECT key, object_key, size, sha256, status, row_xmin FROM {} WHERE migration = %s AND key = %s"
        ).format(_ledger(state_schema)),
        (migration, key),
    ).fetchone()
    return Entry(*row) if row else None


def record(
    conn: psycopg.Connection,
    state_schema: str,
    migration: str,
    key: str,
    *,
    status: str,
    row_xmin: str | None,
    object_key: str | None = None,
    size: int | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> None:
    """Upsert a ledger row (in the caller's transaction)."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} AS l (migration, key, object_key, size, sha256, status, reason, row_xmin) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (migration, key) DO UPDATE SET "
            "object_key = EXCLUDED.object_key, size = EXCLUDED.size, sha256 = EXCLUDED.sha256, "
            "status = EXCLUDED.status, reason = EXCLUDED.reason, row_xmin = EXCLUDED.row_xmin, "
            "updated_at = clock_timestamp()"
        ).format(_ledger(state_schema)),
        (migration, key, object_key, size, sha256, status, reason, row_xmin),
    )


def record_empty(conn: psycopg.Connection, src: Source, migration: str, state_schema: str, *, has_path: bool) -> int:
    """Record rows whose data is NULL (and that point nowhere) as failed: there is no file to move."""
    nowhere = sql.SQL(" AND t.{} IS NULL").format(sql.Identifier(src.path)) if has_path else sql.SQL("")
    cur = conn.execute(
        sql.SQL(
            "INSERT INTO {ledger} (migration, key, status, reason, row_xmin) "
            "SELECT %s, t.{key}::text, 'failed', 'NULL data: no file to migrate', t.xmin::text FROM {rel} t "
            "WHERE t.{data} IS NULL{nowhere} ON CONFLICT (migration, key) DO NOTHING"
        ).format(
            ledger=_ledger(state_schema),
            key=sql.Identifier(src.key),
            rel=src.relation,
            data=sql.Identifier(src.data),
            nowhere=nowhere,
        ),
        (migration,),
    )
    return cur.rowcount


def set_pointer(conn: psycopg.Connection, src: Source, key: Any, path: str, storage_type: str) -> str:
    """Point the row at its object; returns the row's new xmin (this transaction's)."""
    row = conn.execute(
        sql.SQL("UPDATE {} SET {} = %s, {} = %s WHERE {} = %s RETURNING xmin::text").format(
            src.relation, sql.Identifier(src.path), sql.Identifier(src.storage_type), sql.Identifier(src.key)
        ),
        (path, storage_type, key),
    ).fetchone()
    assert row is not None
    return str(row[0])


def null_source(conn: psycopg.Connection, src: Source, key: Any, expected_xmin: str) -> str | None:
    """NULL the data of a row, only if nobody changed the row since pgscale pointed it at its object."""
    row = conn.execute(
        sql.SQL("UPDATE {} SET {} = NULL WHERE {} = %s AND xmin::text = %s RETURNING xmin::text").format(
            src.relation, sql.Identifier(src.data), sql.Identifier(src.key)
        ),
        (key, expected_xmin),
    ).fetchone()
    return str(row[0]) if row else None


def cutover_keys(conn: psycopg.Connection, src: Source, migration: str, state_schema: str) -> Iterator[Any]:
    """Rows that point at a verified object and still hold their data: ready to be nulled."""
    query = sql.SQL(
        "SELECT t.{key} FROM {rel} t JOIN {ledger} l ON l.migration = %s AND l.key = t.{key}::text "
        "WHERE t.{data} IS NOT NULL AND l.status = 'cutover' AND l.row_xmin = t.xmin::text ORDER BY t.{key}"
    ).format(key=sql.Identifier(src.key), rel=src.relation, ledger=_ledger(state_schema), data=sql.Identifier(src.data))
    with conn.transaction(), conn.cursor(name="pgscale_file_cutover") as cur:
        cur.itersize = 1000
        cur.execute(query, (migration,))
        for row in cur:
            yield row[0]


def verification_set(
    conn: psycopg.Connection, src: Source, migration: str, state_schema: str
) -> Iterator[tuple[Any, ...]]:
    """Every row with its pointer and the ledger's object, size and hash (for the final pass)."""
    query = sql.SQL(
        "SELECT t.{key}::text, t.{path}, l.object_key, l.size, l.sha256, l.status FROM {rel} t "
        "LEFT JOIN {ledger} l ON l.migration = %s AND l.key = t.{key}::text ORDER BY t.{key}"
    ).format(key=sql.Identifier(src.key), path=sql.Identifier(src.path), rel=src.relation, ledger=_ledger(state_schema))
    with conn.transaction(), conn.cursor(name="pgscale_file_verify") as cur:
        cur.itersize = 1000
        cur.execute(query, (migration,))
        yield from cur


def rows_with_data(conn: psycopg.Connection, src: Source) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(src.relation, sql.Identifier(src.data))
    ).fetchone()
    return int(row[0]) if row else 0


def vacuum(conn: psycopg.Connection, src: Source) -> None:
    """VACUUM (ANALYZE) the table: space of nulled values becomes reusable (not returned to the OS)."""
    conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(src.relation))


def guard_name(src: Source) -> str:
    return f"pgscale_{src.data}_migrated"[:63]


def guard_data_column(conn: psycopg.Connection, src: Source, lock_timeout_ms: int) -> bool:
    """Forbid new data in the column (CHECK ... IS NULL), then prove no row has any.

    From the moment the constraint exists, a write of new data fails loudly instead
    of being lost with the column. NOT VALID takes the strong lock only for an instant;
    VALIDATE scans under a lock that lets the application go on writing. Returns
    False (and removes the guard) when some row still holds data.
    """
    name = sql.Identifier(guard_name(src))
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        exists = conn.execute(
            "SELECT 1 FROM pg_constraint WHERE conname = %s AND conrelid = %s::regclass",
            (guard_name(src), src.relation.as_string(conn)),
        ).fetchone()
        if exists is None:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NULL) NOT VALID").format(
                    src.relation, name, sql.Identifier(src.data)
                )
            )
    try:
        conn.execute(sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(src.relation, name))
    except psycopg.errors.CheckViolation:
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(src.relation, name))
        return False
    return True


def unguard_data_column(conn: psycopg.Connection, src: Source) -> None:
    conn.execute(
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(src.relation, sql.Identifier(guard_name(src)))
    )


def drop_data_column(conn: psycopg.Connection, src: Source, lock_timeout_ms: int) -> None:
    """Drop the column (its guard constraint goes with it)."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(src.relation, sql.Identifier(src.data)))


def _count_holding(conn: psycopg.Connection, src: Source, migration: str, state_schema: str, status: str) -> int:
    """Rows that still hold data, with a ledger entry of `status` from their current version."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {rel} t JOIN {ledger} l ON l.migration = %s AND l.key = t.{key}::text "
            "WHERE t.{data} IS NOT NULL AND l.status = %s AND l.row_xmin = t.xmin::text"
        ).format(
            rel=src.relation, ledger=_ledger(state_schema), key=sql.Identifier(src.key), data=sql.Identifier(src.data)
        ),
        (migration, status),
    ).fetchone()
    return int(row[0]) if row else 0


def count_ready_to_null(conn: psycopg.Connection, src: Source, migration: str, state_schema: str) -> int:
    """Rows pointing at a verified object that still hold their data, unchanged since."""
    return _count_holding(conn, src, migration, state_schema, "cutover")


def count_failed_holding(conn: psycopg.Connection, src: Source, migration: str, state_schema: str) -> int:
    """Rows that still hold data the migration could not move (malformed): they keep the column."""
    return _count_holding(conn, src, migration, state_schema, "failed")


def has_nulled(conn: psycopg.Connection, migration: str, state_schema: str) -> bool:
    """Whether this migration nulled any row (so a missing data column is its doing, not a typo)."""
    if table_columns(conn, state_schema, LEDGER) is None:
        return False
    row = conn.execute(
        sql.SQL("SELECT 1 FROM {} WHERE migration = %s AND status = 'nulled' LIMIT 1").format(_ledger(state_schema)),
        (migration,),
    ).fetchone()
    return row is not None


def pending_bytes(conn: psycopg.Connection, src: Source, migration: str, state_schema: str, *, cutover: bool) -> int:
    """Stored size of the rows still to migrate (for a dry run)."""
    query = sql.SQL("SELECT coalesce(sum(octet_length(t.{})), 0) {}").format(
        sql.Identifier(src.data), _needing_work(src, state_schema, cutover)
    )
    row = conn.execute(query, (migration,)).fetchone()
    return int(row[0]) if row else 0


@dataclass
class Counts:
    """Ledger figures for status."""

    by_status: dict[str, int]
    bytes_done: int
    bytes_nulled: int
    rows_last_minute: int
    bytes_last_minute: int
    failed: list[tuple[str, str]]


def counts(conn: psycopg.Connection, state_schema: str, migration: str) -> Counts:
    if table_columns(conn, state_schema, LEDGER) is None:
        return Counts({}, 0, 0, 0, 0, [])
    rows = conn.execute(
        sql.SQL(
            "SELECT status, count(*), coalesce(sum(size), 0), "
            "count(*) FILTER (WHERE updated_at > clock_timestamp() - interval '60 seconds'), "
            "coalesce(sum(size) FILTER (WHERE updated_at > clock_timestamp() - interval '60 seconds'), 0) "
            "FROM {} WHERE migration = %s GROUP BY status"
        ).format(_ledger(state_schema)),
        (migration,),
    ).fetchall()
    failed = conn.execute(
        sql.SQL("SELECT key, reason FROM {} WHERE migration = %s AND status = 'failed' ORDER BY key LIMIT 20").format(
            _ledger(state_schema)
        ),
        (migration,),
    ).fetchall()
    done = [r for r in rows if r[0] != "failed"]
    return Counts(
        by_status={r[0]: int(r[1]) for r in rows},
        bytes_done=sum(int(r[2]) for r in done),
        bytes_nulled=sum(int(r[2]) for r in rows if r[0] == "nulled"),
        rows_last_minute=sum(int(r[3]) for r in done),
        bytes_last_minute=sum(int(r[4]) for r in done),
        failed=[(str(k), str(r)) for k, r in failed],
    )
