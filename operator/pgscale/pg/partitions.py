"""SQL of PartitionPolicy maintenance: partitions with their bounds, creating and retiring them.

A partition is never created with CREATE TABLE ... PARTITION OF while a DEFAULT
partition holds rows of its range (pg_partman's "updated partition constraint for
default partition would be violated"). Instead, in one transaction: a standalone
table with a CHECK matching the bounds (so ATTACH skips scanning it), the rows of
that range moved out of the DEFAULT partition (locked against new inserts for the
moment), then ATTACH PARTITION, which takes only SHARE UPDATE EXCLUSIVE on the parent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from . import ensure_schema, qualified
from .relationships import ForeignKey


@dataclass(frozen=True)
class Part:
    """A partition as the catalog describes it."""

    schema: str
    name: str
    bound: str  # pg_get_expr(relpartbound)
    is_default: bool
    rows_estimate: int
    bytes: int
    detach_pending: bool = False


def children(conn: psycopg.Connection, schema: str, table: str) -> list[Part]:
    """Every direct partition, including ones a DETACH ... CONCURRENTLY left pending (the one catalog query)."""
    rows = conn.execute(
        "SELECT cn.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint, "
        "pg_total_relation_size(c.oid), i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_namespace cn ON cn.oid = c.relnamespace JOIN pg_class p ON p.oid = i.inhparent "
        "JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE pn.nspname = %s AND p.relname = %s "
        "ORDER BY c.relname",
        (schema, table),
    ).fetchall()
    return [
        Part(r[0], r[1], r[2] or "", (r[2] or "") == "DEFAULT", max(int(r[3] or 0), 0), int(r[4]), bool(r[5]))
        for r in rows
    ]


def parts(conn: psycopg.Connection, schema: str, table: str) -> list[Part]:
    """The attached partitions."""
    return [p for p in children(conn, schema, table) if not p.detach_pending]


def range_key(conn: psycopg.Connection, schema: str, table: str) -> list[str] | None:
    """The partition key columns of a RANGE-partitioned table, or None."""
    row = conn.execute(
        "SELECT p.partstrat, (SELECT array_agg(a.attname ORDER BY k.ord) FROM unnest(p.partattrs) "
        "WITH ORDINALITY k(attnum, ord) JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.attnum), "
        "p.partnatts "
        "FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    if row is None or row[0] != "r" or row[1] is None or len(row[1]) != int(row[2]):
        return None  # not RANGE, or a key with an expression (it has no column name)
    return list(row[1])


def pending_detaches(conn: psycopg.Connection, schema: str, table: str) -> list[Part]:
    """Partitions a DETACH ... CONCURRENTLY left half done (lock timeout, crash): FINALIZE finishes them."""
    return [p for p in children(conn, schema, table) if p.detach_pending]


def bound_literal(column_type: str, day: date, time_zone: str) -> sql.Composable:
    """A range bound for the column's type: local midnight in the policy's time zone."""
    if column_type == "date":
        return sql.Literal(day.isoformat())
    midnight = datetime.combine(day, time(0), tzinfo=ZoneInfo(time_zone))
    if column_type.startswith("timestamp with"):
        return sql.Literal(midnight.isoformat())
    return sql.Literal(midnight.replace(tzinfo=None).isoformat(sep=" "))


def bounds_of(conn: psycopg.Connection, part: Part, column_type: str) -> tuple[str, str] | None:
    """A range partition's (from, to) as text in the column's type (None for DEFAULT/MINVALUE/MAXVALUE)."""
    if part.is_default or "MINVALUE" in part.bound or "MAXVALUE" in part.bound or " TO (" not in part.bound:
        return None
    lower = part.bound.split("FROM (", 1)[1].split(") TO (", 1)[0].strip("'")
    upper = part.bound.split(" TO (", 1)[1].rstrip(")").strip("'")
    return lower, upper


def create(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    column: str,
    name: str,
    lower: sql.Composable,
    upper: sql.Composable,
    columns: list[str],
    default: Part | None,
    lock_timeout_ms: int,
) -> int:
    """Create and attach one partition; returns the rows moved out of the DEFAULT partition."""
    parent, child = qualified(schema, table), qualified(schema, name)
    col = sql.Identifier(column)
    check = sql.Identifier(f"{name}_pgscale_bounds"[:63])
    generated = {
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attgenerated <> ''",
            (parent.as_string(conn),),
        ).fetchall()
    }
    # Generated columns are computed again in the partition: never inserted.
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns if c not in generated)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED "
                "INCLUDING STORAGE)"
            ).format(child, parent)
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL AND {} >= {} AND {} < {})").format(
                child, check, col, col, lower, col, upper
            )
        )
        moved = 0
        if default is not None:
            dflt = qualified(default.schema, default.name)
            # No new row of this range can land in DEFAULT until the partition exists.
            conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(dflt))
            cur = conn.execute(
                sql.SQL(
                    "WITH moved AS (DELETE FROM {d} WHERE {c} >= {lo} AND {c} < {hi} RETURNING {cols}) "
                    "INSERT INTO {child} ({cols}) SELECT {cols} FROM moved"
                ).format(d=dflt, c=col, lo=lower, hi=upper, cols=cols, child=child)
            )
            moved = cur.rowcount
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                parent, child, lower, upper
            )
        )
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(child, check))
    return moved


def create_default(conn: psycopg.Connection, schema: str, table: str, lock_timeout_ms: int) -> str:
    name = f"{table}_default"[:63]
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(qualified(schema, name), qualified(schema, table))
        )
    return name


def default_days(
    conn: psycopg.Connection, default: Part, column: str, column_type: str, time_zone: str, limit: int = 100
) -> list[date]:
    """Local days of rows sitting in the DEFAULT partition (they belong in partitions of their own)."""
    col = sql.Identifier(column)
    day = (
        sql.SQL("({} AT TIME ZONE {})::date").format(col, sql.Literal(time_zone))
        if column_type.startswith("timestamp with")
        else sql.SQL("{}::date").format(col)
    )
    rows = conn.execute(
        sql.SQL("SELECT DISTINCT {} FROM {} WHERE {} IS NOT NULL ORDER BY 1 LIMIT %s").format(
            day, qualified(default.schema, default.name), col
        ),
        (limit,),
    ).fetchall()
    return [r[0] for r in rows]


def bound_values(conn: psycopg.Connection, bounds: list[tuple[str, str]], column_type: str) -> set[tuple[Any, Any]]:
    """Partition bounds as values of the column's type (text bounds differ with the session's time zone)."""
    if not bounds:
        return set()
    rows = conn.execute(
        sql.SQL("SELECT CAST(lo AS {t}), CAST(hi AS {t}) FROM unnest(%s::text[], %s::text[]) b(lo, hi)").format(
            t=sql.SQL(column_type)  # format_type() output from the catalog, never spec text
        ),
        ([b[0] for b in bounds], [b[1] for b in bounds]),
    ).fetchall()
    return {(r[0], r[1]) for r in rows}


def literal_values(
    conn: psycopg.Connection, lower: sql.Composable, upper: sql.Composable, column_type: str
) -> tuple[Any, Any]:
    row = conn.execute(
        sql.SQL("SELECT CAST({lo} AS {t}), CAST({hi} AS {t})").format(lo=lower, hi=upper, t=sql.SQL(column_type))
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def ends_by(conn: psycopg.Connection, upper: str, cutoff: sql.Composable, column_type: str) -> bool:
    """Whether a partition's upper bound is at or before the cutoff (compared in the column's type)."""
    row = conn.execute(
        sql.SQL("SELECT CAST(%s AS {t}) <= CAST({c} AS {t})").format(t=sql.SQL(column_type), c=cutoff), (upper,)
    ).fetchone()  # column_type is format_type() output from the catalog, never spec text
    return bool(row and row[0])


RETIRING_MARK = "pgscale: retiring from "


def _mark(schema: str, table: str) -> str:
    return f"{RETIRING_MARK}{schema}.{table}"


def referenced_rows(conn: psycopg.Connection, part: Part, fk: ForeignKey) -> bool:
    """Whether any row of the foreign key's table points at a row of this partition."""
    child, ref = sql.Identifier("c"), sql.Identifier("p")
    link = sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}.{}").format(child, sql.Identifier(a), ref, sql.Identifier(b))
        for a, b in zip(fk.columns, fk.ref_columns, strict=True)
    )
    row = conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} c JOIN {} p ON {})").format(
            qualified(fk.schema, fk.table), qualified(part.schema, part.name), link
        )
    ).fetchone()
    return bool(row and row[0])


def retire(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    part: Part,
    *,
    action: str,
    archive_schema: str | None,
    concurrently: bool,
    lock_timeout_ms: int,
    finalize: bool = False,
) -> None:
    """Detach a partition (then drop it, or move it to the archive schema, or leave it as a table).

    The partition is marked first, while still attached: if the step after the detach fails
    (a lock not granted, a crash), ``retired_leftovers`` finds the table and the next
    maintenance finishes it, instead of leaving a table nobody looks after.
    """
    parent, child = qualified(schema, table), qualified(part.schema, part.name)
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{lock_timeout_ms}ms",))
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(child, sql.Literal(_mark(schema, table))))
    if finalize:
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, child))
    elif concurrently:
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, child))
    else:
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(parent, child))
    finish_retire(conn, part.schema, part.name, action=action, archive_schema=archive_schema)


def finish_retire(conn: psycopg.Connection, schema: str, name: str, *, action: str, archive_schema: str | None) -> None:
    """What follows the detach, in one transaction with the removal of the mark. For export the mark
    stays: the caller exports the table and drops it (a crash in between leaves it a leftover)."""
    if action == "export":
        return
    child = qualified(schema, name)
    with conn.transaction():
        if action == "drop":
            conn.execute(sql.SQL("DROP TABLE {}").format(child))
            return
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS NULL").format(child))
        if archive_schema and archive_schema != schema:
            ensure_schema(conn, archive_schema)
            conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(child, sql.Identifier(archive_schema)))


def marked_tables(conn: psycopg.Connection, mark: str) -> list[tuple[str, str]]:
    """Plain tables (no longer partitions) whose comment is this mark: detached, work still to finish."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0 "
        "WHERE c.relkind = 'r' AND NOT c.relispartition AND d.description = %s ORDER BY c.relname",
        (mark,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def retired_leftovers(conn: psycopg.Connection, schema: str, table: str) -> list[tuple[str, str]]:
    """Tables detached from this table whose drop or move did not happen (schema, name)."""
    return marked_tables(conn, _mark(schema, table))


def drop_if_empty(conn: psycopg.Connection, part: Part, schema: str, table: str, lock_timeout_ms: int) -> bool:
    """Drop a partition that holds no row (checked under the lock that keeps rows from arriving)."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(qualified(schema, table)))
        child = qualified(part.schema, part.name)
        row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(child)).fetchone()
        if row and row[0]:
            return False
        conn.execute(sql.SQL("DROP TABLE {}").format(child))
    return True
