"""SQL of converting a live table into a range-partitioned one (copy + change log, then a swap).

How it stays online and exact (the method of pg_repack and pg-osc, on native partitions):

1. *build* (one transaction): a partitioned shadow table ``<table>_pgscale_new`` with the
   table's columns, defaults, identity, CHECK/NOT NULL constraints, comments, grants,
   owner, primary key, unique constraints, indexes and outgoing foreign keys, and its
   partitions. The table is not touched. A fingerprint of the table's definition is kept.
2. *log* (one short transaction): a change log and a trigger (``ENABLE ALWAYS``: replication
   and restore sessions fire it too) that records the key of every row inserted, updated
   or deleted, in the writer's own transaction. Only CREATE TRIGGER locks the table (SHARE
   ROW EXCLUSIVE, milliseconds). The trigger writes nothing else, so it works the same
   for READ COMMITTED, REPEATABLE READ and SERIALIZABLE writers.
3. *copy*: committed batches in primary-key order from a plain snapshot read (no row
   locks), inserted with ``ON CONFLICT (key) DO NOTHING``; the cursor is committed with
   each batch.
4. *replay*: logged keys are taken off the log in batches; for each, the copy's row is
   deleted and the table's current row (if any) inserted, in one READ COMMITTED
   transaction: idempotent, and always converging on the table's latest committed state.
5. *verify*: one REPEATABLE READ snapshot counts and checksums both tables, leaving out
   the keys still in the log (their rows are replayed again before the switch).
6. *swap* (one transaction, ACCESS EXCLUSIVE on the table under ``lock_timeout``): the
   definition fingerprint is compared (a change rolls the swap back), the rest of the log
   is replayed with no writer able to interfere, then triggers, sequences, index and
   constraint names and table names are switched.
7. *cleanup*: drop the old table (it was verified) unless asked to keep it, the log and
   the trigger functions.

Every statement text comes from this module; names from specs go through
``sql.Identifier``, values are parameters or ``sql.Literal``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from ..api.partitionpolicy import ConversionStep
from . import ensure_state_table, qualified

STATE_TABLE = "partition_conversions"
STATE_DEFINITION = (
    "table_schema text NOT NULL, table_name text NOT NULL, phase text NOT NULL, shadow text NOT NULL, "
    "cursor text[], rows_total bigint, rows_copied bigint NOT NULL DEFAULT 0, "
    "copy_started_at timestamptz, longest_lock_ms integer NOT NULL DEFAULT 0, lock_retries integer NOT NULL "
    "DEFAULT 0, verified_rows bigint, message text, started_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, definition text, "
    "PRIMARY KEY (table_schema, table_name)"
)
LOG_ID = "pgscale_log_id"
TRIGGER = "pgscale_partition_sync"
TRUNCATE_TRIGGER = "pgscale_partition_sync_truncate"
PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"})


def shadow_name(table: str) -> str:
    return f"{table.encode()[:46].decode(errors='ignore')}_pgscale_new"


def old_name(table: str) -> str:
    return f"{table.encode()[:46].decode(errors='ignore')}_pgscale_old"


@dataclass
class Index:
    """An index of the table, or the index of a key constraint."""

    oid: int
    name: str
    definition: str  # pg_get_indexdef
    unique: bool
    columns: list[str]  # plain columns of the key (empty entries for expressions)
    constraint: str | None = None  # the PRIMARY KEY / UNIQUE / EXCLUDE constraint it backs
    constraint_type: str | None = None  # p, u, x
    tail: str | None = None  # pg_get_indexdef after "... ON <table> USING ": None when it does not read so
    condef: str | None = None  # pg_get_constraintdef of the key constraint, e.g. PRIMARY KEY (id) DEFERRABLE

    quoted_keys: str = ""  # the key columns as pg_get_constraintdef writes them (quote_ident)

    def widened(self, column: str) -> str | None:
        """The key's definition with the partition column added; None when it has options that forbid it."""
        kind = "PRIMARY KEY" if self.constraint_type == "p" else "UNIQUE"
        if self.condef != f"{kind} ({self.quoted_keys})":  # INCLUDE, DEFERRABLE, NULLS NOT DISTINCT...
            return None
        return f"{kind} ({self.quoted_keys}, {sql.Identifier(column).as_string(None)})"


@dataclass
class ForeignKey:
    oid: int
    name: str
    table: str  # qualified, quoted: for messages
    schema_name: str
    table_name: str
    definition: str  # pg_get_constraintdef


@dataclass
class Shape:
    """What the catalog says about a table, for planning its conversion."""

    oid: int
    owner: str
    columns: list[str]  # live columns in order
    types: dict[str, str]  # format_type per column
    generated: set[str]
    identity: set[str]
    primary_key: list[str]
    indexes: list[Index]
    checks: list[str]
    outgoing: list[ForeignKey]
    incoming: list[ForeignKey]
    views: list[str]
    triggers: list[str]
    rls: bool
    publications: list[str]
    inheritance: bool
    comment: str | None
    owned_sequences: list[tuple[str, str]]  # (qualified sequence, column) owned via serial/OWNED BY
    not_null: set[str] = field(default_factory=set)
    not_valid: list[str] = field(default_factory=list)  # NOT VALID constraints (rows may break them)
    acl: list[tuple[str | None, str, bool]] = field(default_factory=list)  # (grantee or PUBLIC=None, priv, grantable)
    column_acl: list[tuple[str, str | None, str, bool]] = field(default_factory=list)


def inspect(conn: psycopg.Connection, schema: str, table: str) -> Shape:
    """Everything the conversion keeps or must refuse, read from the catalog."""
    row = conn.execute(
        "SELECT c.oid, pg_get_userbyid(c.relowner), c.relrowsecurity OR c.relforcerowsecurity, "
        "obj_description(c.oid, 'pg_class'), EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid "
        "OR i.inhparent = c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r'",
        (schema, table),
    ).fetchone()
    if row is None:
        raise LookupError(f"{schema}.{table} is not a plain table")
    oid = int(row[0])
    cols = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '', attidentity <> '', attnotnull "
        "FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (oid,),
    ).fetchall()
    indexes = []
    for r in conn.execute(
        "SELECT i.indexrelid, ic.relname, d.def, i.indisunique, "
        "ARRAY(SELECT coalesce(a.attname, '') FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY k(n, o) "
        "LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o), "
        "con.conname, con.contype, CASE WHEN starts_with(d.def, d.head) THEN substr(d.def, length(d.head) + 1) END, "
        "pg_get_constraintdef(con.oid), (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.o) "
        "FROM unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n) "
        "FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_namespace tn ON tn.oid = t.relnamespace "
        "CROSS JOIN LATERAL (SELECT pg_get_indexdef(i.indexrelid) AS def, format('CREATE %%sINDEX %%s ON %%s.%%s "
        "USING ', CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END, quote_ident(ic.relname), "
        "quote_ident(tn.nspname), quote_ident(t.relname)) AS head) d "
        "LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid "
        "AND con.contype IN ('p', 'u', 'x') WHERE i.indrelid = %s AND i.indisvalid ORDER BY ic.relname",
        (oid,),
    ).fetchall():
        indexes.append(Index(int(r[0]), r[1], r[2], bool(r[3]), list(r[4]), r[5], r[6], r[7], r[8], r[9] or ""))
    primary_key = next((i.columns for i in indexes if i.constraint_type == "p"), [])
    checks = [
        r[0]
        for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s AND contype = 'c' ORDER BY conname", (oid,)
        ).fetchall()
    ]
    not_valid = [
        r[0]
        for r in conn.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = %s AND NOT convalidated ORDER BY conname", (oid,)
        ).fetchall()
    ]
    fk_query = (
        "SELECT con.oid, con.conname, quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname, c.relname, "
        "pg_get_constraintdef(con.oid) FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE con.contype = 'f' AND {} = %s ORDER BY con.conname"
    )
    # A key referencing the table itself counts as incoming: it cannot survive the conversion as it is.
    outgoing = [
        ForeignKey(*r)
        for r in conn.execute(fk_query.format("con.confrelid <> con.conrelid AND con.conrelid"), (oid,)).fetchall()
    ]
    incoming = [ForeignKey(*r) for r in conn.execute(fk_query.format("con.confrelid"), (oid,)).fetchall()]
    views = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT quote_ident(vn.nspname) || '.' || quote_ident(v.relname) FROM pg_depend d "
            "JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class "
            "JOIN pg_namespace vn ON vn.oid = v.relnamespace "
            "WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = %s AND v.oid <> %s ORDER BY 1",
            (oid, oid),
        ).fetchall()
    ]
    triggers = [
        r[0]
        for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgname NOT IN (%s, %s) "
            "ORDER BY tgname",
            (oid, TRIGGER, TRUNCATE_TRIGGER),
        ).fetchall()
    ]
    policies = conn.execute("SELECT count(*) FROM pg_policy WHERE polrelid = %s", (oid,)).fetchone()
    publications = [
        r[0]
        for r in conn.execute(
            "SELECT p.pubname FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid "
            "WHERE pr.prrelid = %s ORDER BY 1",
            (oid,),
        ).fetchall()
    ]
    owned = [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT quote_ident(sn.nspname) || '.' || quote_ident(s.relname), a.attname FROM pg_depend d "
            "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
            "WHERE d.refobjid = %s AND d.deptype = 'a' AND d.classid = 'pg_class'::regclass",
            (oid,),
        ).fetchall()
    ]
    acl = [
        (r[0], r[1], bool(r[2]))
        for r in conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, "
            "a.is_grantable FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = %s AND a.grantee <> c.relowner",
            (oid,),
        ).fetchall()
    ]
    column_acl = [
        (r[0], r[1], r[2], bool(r[3]))
        for r in conn.execute(
            "SELECT att.attname, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, "
            "a.privilege_type, a.is_grantable FROM pg_attribute att, aclexplode(att.attacl) a "
            "WHERE att.attrelid = %s AND att.attnum > 0 AND NOT att.attisdropped",
            (oid,),
        ).fetchall()
    ]
    return Shape(
        oid=oid,
        owner=row[1],
        columns=[c[0] for c in cols],
        types={c[0]: c[1] for c in cols},
        generated={c[0] for c in cols if c[2]},
        identity={c[0] for c in cols if c[3]},
        primary_key=primary_key,
        indexes=indexes,
        checks=checks,
        outgoing=outgoing,
        incoming=incoming,
        views=views,
        triggers=triggers,
        rls=bool(row[2]) or bool(policies and policies[0]),
        publications=publications,
        inheritance=bool(row[4]),
        comment=row[3],
        owned_sequences=owned,
        not_null={c[0] for c in cols if c[4]},
        not_valid=not_valid,
        acl=acl,
        column_acl=column_acl,
    )


def missing_on_shadow(conn: psycopg.Connection, schema: str, shape: Shape) -> list[str]:
    """Indexes and keys of the table that the copy lacks (created after the copy was built)."""
    wanted = {f"pgscale_{'con' if i.constraint_type in ('p', 'u') else 'idx'}_{i.oid}": i.name for i in shape.indexes}
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (schema, list(wanted)),
    ).fetchall()
    found = {r[0] for r in rows}
    return sorted(name for temp, name in wanted.items() if temp not in found)


def definition(conn: psycopg.Connection, schema: str, table: str) -> str:
    """A fingerprint of everything about the table the copy mirrors or depends on.

    Columns (type, NOT NULL, default, generated, identity), valid indexes, constraints on and
    pointing at the table, triggers other than pgscale's, dependent views, publications and
    row-level security. Computed when the copy is built and again under the switch's lock:
    any difference means the copy no longer matches the table.
    """
    row = conn.execute(
        "SELECT md5(concat_ws('|', "
        "(SELECT string_agg(concat_ws(':', a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
        "a.attgenerated::text, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid)), "
        "',' ORDER BY a.attnum) FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid "
        "AND d.adnum = a.attnum WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), "
        "(SELECT string_agg(pg_get_indexdef(i.indexrelid), ',' ORDER BY 1) FROM pg_index i "
        "WHERE i.indrelid = c.oid AND i.indisvalid), "
        "(SELECT string_agg(concat_ws(':', k.conname, pg_get_constraintdef(k.oid), k.convalidated), ',' "
        "ORDER BY 1) FROM pg_constraint k WHERE k.conrelid = c.oid OR k.confrelid = c.oid), "
        "(SELECT string_agg(concat_ws(':', t.tgname, t.tgenabled::text), ',' ORDER BY 1) FROM pg_trigger t "
        "WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgname NOT IN (%s, %s)), "
        "(SELECT string_agg(DISTINCT r.ev_class::text, ',') FROM pg_depend dp JOIN pg_rewrite r ON r.oid = dp.objid "
        "WHERE dp.classid = 'pg_rewrite'::regclass AND dp.refobjid = c.oid AND r.ev_class <> c.oid), "
        "(SELECT string_agg(pr.prpubid::text, ',' ORDER BY 1) FROM pg_publication_rel pr WHERE pr.prrelid = c.oid), "
        "c.relrowsecurity::text)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (TRIGGER, TRUNCATE_TRIGGER, schema, table),
    ).fetchone()
    return str(row[0]) if row and row[0] else ""


def existing_tables(conn: psycopg.Connection, schema: str, names: list[str]) -> list[str]:
    """Which of these names are taken in the schema (partitions to be created must not be)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (schema, names),
    ).fetchall()
    return sorted(r[0] for r in rows)


def local_day_range(
    conn: psycopg.Connection, schema: str, table: str, column: str, column_type: str, time_zone: str
) -> tuple[date | None, date | None]:
    """The first and last local day of the partition column's values (None when the table is empty)."""
    col = sql.Identifier(column)

    def day(agg: str) -> sql.Composed:
        # ±infinity has no partition of its own: such rows go to the DEFAULT partition.
        value = sql.SQL("{}({}) FILTER (WHERE isfinite({}))").format(sql.SQL(agg), col, col)
        if column_type.startswith("timestamp with"):
            return sql.SQL("({} AT TIME ZONE {})::date").format(value, sql.Literal(time_zone))
        return sql.SQL("{}::date").format(value)

    lo, hi = day("min"), day("max")
    row = conn.execute(sql.SQL("SELECT {}, {} FROM {}").format(lo, hi, qualified(schema, table))).fetchone()
    return (row[0], row[1]) if row else (None, None)


# --- state ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """The table a conversion works on, the connection it works through, and where its state row is."""

    conn: psycopg.Connection
    state_schema: str
    schema: str
    table: str


# Where a conversion stands, in order; "none" is no state row (nothing started, or forgotten).
Phase = ConversionStep
# Before the switch: the application still uses the original table, which the copy follows.
BEFORE_SWITCH: tuple[Phase, ...] = ("building", "prepared", "copied", "verified")
# A conversion under way: its trigger, copy or log exist, or (swapped) the old table is still there.
IN_FLIGHT: tuple[Phase, ...] = (*BEFORE_SWITCH, "swapped")


@dataclass
class State:
    """One conversion's bookkeeping row."""

    phase: Phase
    shadow: str
    cursor: list[str] | None
    rows_total: int | None
    rows_copied: int
    copy_started_at: Any
    longest_lock_ms: int
    lock_retries: int
    verified_rows: int | None
    message: str | None
    started_at: Any
    updated_at: Any
    finished_at: Any
    definition: str | None = None  # fingerprint of the table's definition when the copy was built


def _state(state_schema: str) -> sql.Composed:
    return qualified(state_schema, STATE_TABLE)


def ensure_state(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(conn, state_schema, STATE_TABLE, STATE_DEFINITION)
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS definition text").format(_state(state_schema)))


def load_state(subject: Subject) -> State | None:
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    exists = conn.execute("SELECT to_regclass(%s)", (f'"{state_schema}"."{STATE_TABLE}"',)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT phase, shadow, cursor, rows_total, rows_copied, copy_started_at, longest_lock_ms, lock_retries, "
            "verified_rows, message, started_at, updated_at, finished_at, definition FROM {} "
            "WHERE table_schema = %s AND table_name = %s"
        ).format(_state(state_schema)),
        (schema, table),
    ).fetchone()
    return State(*row) if row else None


def update_state(subject: Subject, *, phase: Phase | None = None, **fields: Any) -> None:
    """Set columns of the state row (names are this module's, values are parameters)."""
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    if phase is not None:
        fields = {"phase": phase, **fields}
    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields)
    conn.execute(
        sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE table_schema = %s AND table_name = %s").format(
            _state(state_schema), sets
        ),
        (*fields.values(), schema, table),
    )


def note_lock(subject: Subject, held_ms: int) -> None:
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    conn.execute(
        sql.SQL(
            "UPDATE {} SET longest_lock_ms = greatest(longest_lock_ms, %s) WHERE table_schema = %s AND table_name = %s"
        ).format(_state(state_schema)),
        (held_ms, schema, table),
    )


def note_retry(subject: Subject) -> None:
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    conn.execute(
        sql.SQL("UPDATE {} SET lock_retries = lock_retries + 1 WHERE table_schema = %s AND table_name = %s").format(
            _state(state_schema)
        ),
        (schema, table),
    )


def forget_state(subject: Subject) -> None:
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    if load_state(subject) is not None:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE table_schema = %s AND table_name = %s").format(_state(state_schema)),
            (schema, table),
        )


def try_lock(conn: psycopg.Connection, schema: str, table: str) -> bool:
    """One conversion or maintenance of a table at a time (session lock: a killed run frees it)."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(hashtextextended('pgscale.partition:' || %s || '.' || %s, 0))", (schema, table)
    ).fetchone()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection, schema: str, table: str) -> None:
    """Release the table's lock. Called in ``finally``: on a dead connection the lock died with the session,
    and raising here ("the connection is closed") would hide the error that killed it."""
    if conn.closed or conn.broken:
        return
    try:
        conn.execute(
            "SELECT pg_advisory_unlock(hashtextextended('pgscale.partition:' || %s || '.' || %s, 0))", (schema, table)
        )
    except psycopg.OperationalError:
        if not (conn.closed or conn.broken):
            raise


# --- prepare -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    """One partition of the shadow: name and SQL literals of its bounds."""

    name: str
    lower: sql.Composable
    upper: sql.Composable


def _key_list(columns: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def _temp_name(prefix: str, oid: int) -> sql.Identifier:
    return sql.Identifier(f"pgscale_{prefix}_{oid}")


def _index_statement(index: Index, schema: str, shadow: str) -> sql.Composed:
    """The index re-created on the shadow: pg_get_indexdef with only its name and table replaced."""
    assert index.tail is not None
    return sql.SQL("CREATE {}INDEX {} ON {} USING {}").format(
        sql.SQL("UNIQUE " if index.unique else ""),
        _temp_name("idx", index.oid),
        qualified(schema, shadow),
        sql.SQL(index.tail),  # catalog text (columns, opclasses, INCLUDE, WHERE), never spec text
    )


def log_name(shape: Shape) -> str:
    """The change log of a conversion (in the state schema): the keys of rows written meanwhile."""
    return f"partition_log_{shape.oid}"


def _functions(shape: Shape) -> tuple[str, str]:
    return f"partition_sync_{shape.oid}", f"partition_sync_truncate_{shape.oid}"


def log_functions(state_schema: str, shape: Shape, schema: str, shadow: str) -> tuple[sql.Composed, sql.Composed]:
    """The row trigger function (logs keys) and the TRUNCATE one (empties the copy and the log)."""
    fn, tfn = _functions(shape)
    log = qualified(state_schema, log_name(shape))
    key = shape.primary_key

    def values(row: str) -> sql.Composable:
        return sql.SQL("INSERT INTO {} ({}) VALUES ({});").format(
            log, _key_list(key), sql.SQL(", ").join(sql.SQL(row + ".{}").format(sql.Identifier(k)) for k in key)
        )

    moved = sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
        sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(k)) for k in key),
        sql.SQL(", ").join(sql.SQL("OLD.{}").format(sql.Identifier(k)) for k in key),
    )
    body = sql.SQL(
        "BEGIN IF TG_OP = 'INSERT' THEN {new} ELSIF TG_OP = 'DELETE' THEN {old} "
        "ELSE {old} IF {moved} THEN {new} END IF; END IF; RETURN NULL; END"
    ).format(new=values("NEW"), old=values("OLD"), moved=moved)
    # SECURITY DEFINER: the application's roles need no privilege on the log or the copy; a fixed
    # search_path keeps it safe.
    definer = "RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {}"
    row_fn = sql.SQL("CREATE FUNCTION {}.{}() " + definer).format(
        sql.Identifier(state_schema), sql.Identifier(fn), sql.Literal(body.as_string(None))
    )
    trunc_body = sql.SQL("BEGIN TRUNCATE {}, {}; RETURN NULL; END").format(qualified(schema, shadow), log)
    trunc_fn = sql.SQL("CREATE FUNCTION {}.{}() " + definer).format(
        sql.Identifier(state_schema), sql.Identifier(tfn), sql.Literal(trunc_body.as_string(None))
    )
    return row_fn, trunc_fn


@dataclass(frozen=True)
class ShadowPlan:
    """The partitioned copy to build, as planned from the spec and the catalog."""

    column: str  # the partition key
    shape: Shape  # the table as the catalog describes it (inspect)
    partitions: tuple[Bounds, ...]
    default_name: str  # the DEFAULT partition
    widen: bool  # add the partition key to primary and unique keys that lack it (spec.conversion.widenKeys)
    rows_total: int | None  # the planner's estimate, for progress
    lock_timeout_ms: int


def build(subject: Subject, plan: ShadowPlan) -> None:
    """Build the partitioned copy, in one transaction that does not touch the table (phase ``building``).

    Its foreign keys lock the tables they point at (SHARE ROW EXCLUSIVE) until the commit, which is
    why this is not the transaction that then waits for the table's lock.
    """
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    shape, shadow = plan.shape, shadow_name(table)
    parent, target = qualified(schema, table), qualified(schema, shadow)
    ensure_state(conn, state_schema)
    with conn.transaction():
        # Its foreign keys lock the tables they point at: never wait for them longer than lockTimeout.
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{plan.lock_timeout_ms}ms",))
        fingerprint = definition(conn, schema, table)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE {} INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING CONSTRAINTS "
                "INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING IDENTITY INCLUDING STATISTICS INCLUDING STORAGE) "
                "PARTITION BY RANGE ({})"
            ).format(target, parent, sql.Identifier(plan.column))
        )
        for part in plan.partitions:
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                    qualified(schema, part.name), target, part.lower, part.upper
                )
            )
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(qualified(schema, plan.default_name), target)
        )
        for index in shape.indexes:
            if index.constraint_type in ("p", "u"):
                # The key as the catalog states it (INCLUDE, NULLS NOT DISTINCT kept), or widened.
                text = index.condef if plan.column in index.columns or not plan.widen else index.widened(plan.column)
                assert text is not None  # blockers() refused keys that cannot be widened
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                        target,
                        _temp_name("con", index.oid),
                        sql.SQL(text),  # catalog text
                    )
                )
            else:
                conn.execute(_index_statement(index, schema, shadow))
        if shape.comment is not None:
            conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(shape.comment)))
        owner = conn.execute("SELECT current_user").fetchone()
        if owner and owner[0] != shape.owner:
            for name in [shadow, plan.default_name, *(p.name for p in plan.partitions)]:
                conn.execute(
                    sql.SQL("ALTER TABLE {} OWNER TO {}").format(qualified(schema, name), sql.Identifier(shape.owner))
                )
        for grantee, privilege, grantable in shape.acl:
            if privilege in PRIVILEGES:
                conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}{}").format(
                        sql.SQL(privilege),
                        target,
                        sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                        sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                    )
                )
        for col, grantee, privilege, grantable in shape.column_acl:
            if privilege in PRIVILEGES:
                conn.execute(
                    sql.SQL("GRANT {} ({}) ON {} TO {}{}").format(
                        sql.SQL(privilege),
                        sql.Identifier(col),
                        target,
                        sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                        sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                    )
                )
        for fk in shape.outgoing:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    target, sql.Identifier(fk.name), sql.SQL(fk.definition)
                )
            )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_schema, table_name, phase, shadow, rows_total, definition) VALUES (%s, %s, "
                "'building', %s, %s, %s) ON CONFLICT (table_schema, table_name) DO UPDATE SET phase = 'building', "
                "shadow = EXCLUDED.shadow, rows_total = EXCLUDED.rows_total, definition = EXCLUDED.definition, "
                "cursor = NULL, rows_copied = 0, copy_started_at = NULL, verified_rows = NULL, message = NULL, "
                "started_at = now(), updated_at = now(), finished_at = NULL"
            ).format(_state(state_schema)),
            (schema, table, shadow, plan.rows_total, fingerprint),
        )


def install_log(subject: Subject, shape: Shape, lock_timeout_ms: int) -> int:
    """The change log and the trigger that fills it (phase ``prepared``). Returns ms the table was locked."""
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    parent = qualified(schema, table)
    log = qualified(state_schema, log_name(shape))
    fn, tfn = _functions(shape)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute(
            sql.SQL("CREATE TABLE {} ({} bigserial PRIMARY KEY, {})").format(
                log,
                sql.Identifier(LOG_ID),
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(sql.Identifier(k), sql.SQL(shape.types[k])) for k in shape.primary_key
                ),  # types: format_type() from the catalog
            )
        )
        row_fn, trunc_fn = log_functions(state_schema, shape, schema, shadow_name(table))
        conn.execute(row_fn)
        conn.execute(trunc_fn)
        update_state(subject, phase="prepared")
        # Last: the only statements that lock the table, held until the commit right after. The time
        # counted includes the wait, during which later lockers of the table queue behind this one.
        locked = time.monotonic()
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}.{}()"
            ).format(sql.Identifier(TRIGGER), parent, sql.Identifier(state_schema), sql.Identifier(fn))
        )
        conn.execute(
            sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.{}()").format(
                sql.Identifier(TRUNCATE_TRIGGER), parent, sql.Identifier(state_schema), sql.Identifier(tfn)
            )
        )
        # Replication apply workers and restores (session_replication_role = replica) must be logged too.
        for name in (TRIGGER, TRUNCATE_TRIGGER):
            conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(parent, sql.Identifier(name)))
    held = int((time.monotonic() - locked) * 1000)
    note_lock(subject, held)
    return held


# --- copy ---------------------------------------------------------------------------------------------


def copy_batch(
    subject: Subject,
    shape: Shape,
    conflict_key: list[str],
    cursor: list[str] | None,
    batch_size: int,
    lock_timeout_ms: int,
) -> tuple[int, list[str] | None]:
    """Copy the next batch in key order and commit it with the cursor. Returns (rows read, new cursor).

    A plain snapshot read: rows written meanwhile are in the log and replayed, so no row is locked
    and a key changed meanwhile cannot move the cursor. ``conflict_key`` is the copy's primary key.
    """
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    shadow = shadow_name(table)
    key = shape.primary_key
    cols = [c for c in shape.columns if c not in shape.generated]
    after: sql.Composable = sql.SQL("")
    if cursor is not None:
        after = sql.SQL("WHERE ({}) > ({})").format(
            _key_list(key),
            sql.SQL(", ").join(
                sql.SQL("CAST({} AS {})").format(sql.Literal(v), sql.SQL(shape.types[k]))  # catalog type text
                for k, v in zip(key, cursor, strict=True)
            ),
        )
    order = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(k)) for k in key)
    statement = sql.SQL(
        "WITH src AS MATERIALIZED (SELECT {cols} FROM {t} {after} ORDER BY {key} LIMIT {n}), "
        "ins AS (INSERT INTO {s} ({cols}){o} SELECT {cols} FROM src ON CONFLICT ({conflict}) DO NOTHING "
        "RETURNING 1) "
        "SELECT (SELECT count(*) FROM src), (SELECT ARRAY[{last}] FROM src ORDER BY {order} LIMIT 1), "
        "(SELECT count(*) FROM ins)"
    ).format(
        cols=_key_list(cols),
        t=qualified(schema, table),
        after=after,
        key=_key_list(key),
        n=sql.Literal(batch_size),
        s=qualified(schema, shadow),
        o=sql.SQL(" OVERRIDING SYSTEM VALUE") if shape.identity else sql.SQL(""),
        conflict=_key_list(conflict_key),
        last=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key),
        order=order,
    )
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        row = conn.execute(statement).fetchone()
        assert row is not None
        read, last = int(row[0]), (list(row[1]) if row[1] is not None else cursor)
        conn.execute(
            sql.SQL(
                "UPDATE {} SET cursor = %s, rows_copied = rows_copied + %s, updated_at = now(), "
                "copy_started_at = coalesce(copy_started_at, now()) WHERE table_schema = %s AND table_name = %s"
            ).format(_state(state_schema)),
            (last, read, schema, table),
        )
    return read, last


def _resync(conn: psycopg.Connection, schema: str, table: str, shape: Shape, keys: sql.Composable) -> None:
    """The copy's rows of these keys replaced by the table's current rows (none where it has none)."""
    cols = [c for c in shape.columns if c not in shape.generated]
    key = _key_list(shape.primary_key)
    conn.execute(sql.SQL("DELETE FROM {} WHERE ({}) IN ({})").format(qualified(schema, shadow_name(table)), key, keys))
    conn.execute(
        sql.SQL("INSERT INTO {s} ({cols}){o} SELECT {cols} FROM {t} WHERE ({key}) IN ({keys})").format(
            s=qualified(schema, shadow_name(table)),
            cols=_key_list(cols),
            t=qualified(schema, table),
            key=key,
            keys=keys,
            o=sql.SQL(" OVERRIDING SYSTEM VALUE") if shape.identity else sql.SQL(""),
        )
    )


def replay_batch(
    subject: Subject,
    shape: Shape,
    batch_size: int,
    lock_timeout_ms: int,
) -> int:
    """Take up to batch_size keys off the log and bring their rows up to date in the copy; returns how many.

    One READ COMMITTED transaction: each statement reads the latest committed rows, so a row
    written again after its key was taken is logged again and replayed later.
    """
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    log = qualified(state_schema, log_name(shape))
    key = shape.primary_key
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        taken = conn.execute(
            sql.SQL("DELETE FROM {l} WHERE {id} IN (SELECT {id} FROM {l} ORDER BY {id} LIMIT %s) RETURNING {k}").format(
                l=log, id=sql.Identifier(LOG_ID), k=_key_list(key)
            ),
            (batch_size,),
        ).fetchall()
        if not taken:
            return 0
        distinct = sorted(set(taken), key=repr)
        arrays = [list(values) for values in zip(*distinct, strict=True)]
        keys = sql.SQL("SELECT * FROM unnest({})").format(
            sql.SQL(", ").join(
                sql.SQL("{}::{}[]").format(sql.Literal(a), sql.SQL(shape.types[k]))
                for a, k in zip(arrays, key, strict=True)
            )
        )
        _resync(conn, schema, table, shape, keys)
    return len(taken)


def _fingerprint(
    conn: psycopg.Connection, target: sql.Composable, shape: Shape, log: sql.Composable
) -> tuple[int, int]:
    row_text = sql.SQL("ROW({})::text").format(
        sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in shape.columns)
    )
    pending = sql.SQL(" AND ").join(sql.SQL("l.{k} = t.{k}").format(k=sql.Identifier(k)) for k in shape.primary_key)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || left(md5({}), 16))::bit(64)::bigint::numeric), 0) FROM {} t "
            "WHERE NOT EXISTS (SELECT 1 FROM {} l WHERE {})"
        ).format(row_text, target, log, pending)
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def verify(subject: Subject, shape: Shape) -> tuple[tuple[int, int], tuple[int, int]]:
    """Count and checksum of the table and of the copy in one snapshot, without the keys still in the log.

    The trigger logs in the writer's transaction, so in any snapshot a row differs between the two
    only if its key is in the log (its replay comes later). No lock that blocks writers is taken.
    """
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    log = qualified(state_schema, log_name(shape))
    with conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        source = _fingerprint(conn, qualified(schema, table), shape, log)
        copy = _fingerprint(conn, qualified(schema, shadow_name(table)), shape, log)
    return source, copy


# --- swap and cleanup ----------------------------------------------------------------------------------


class DefinitionChanged(Exception):
    """The table's definition differs from the one the copy was built from (the switch rolled back)."""


def swap(
    subject: Subject,
    shape: Shape,
    built_from: str,
    *,
    drop_incoming: bool,
    lock_timeout_ms: int,
    checkpoint: Any = None,
) -> int:
    """Put the partitioned table in the table's place, in one transaction. Returns ms the table was locked.

    Under the lock nobody writes the table: the definition is compared with the one the copy was
    built from (DefinitionChanged, rolled back, when it differs) and the rest of the log replayed.
    """
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    shadow, old = shadow_name(table), old_name(table)
    parent, target = qualified(schema, table), qualified(schema, shadow)
    log = qualified(state_schema, log_name(shape))
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        locked = time.monotonic()
        conn.execute(sql.SQL("LOCK TABLE {}, {} IN ACCESS EXCLUSIVE MODE").format(parent, target))
        if definition(conn, schema, table) != built_from:
            raise DefinitionChanged(f"{schema}.{table}")
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s AND tgname IN (%s, %s) AND tgenabled = 'A'",
            (shape.oid, TRIGGER, TRUNCATE_TRIGGER),
        ).fetchone()
        if not triggers or triggers[0] != 2:  # disabled or dropped by hand: writes may have gone unlogged
            raise DefinitionChanged(f"{schema}.{table}: pgscale's triggers were disabled or dropped")
        _resync(conn, schema, table, shape, sql.SQL("SELECT {} FROM {}").format(_key_list(shape.primary_key), log))
        conn.execute(sql.SQL("DELETE FROM {}").format(log))
        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(TRIGGER), parent))
        conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(TRUNCATE_TRIGGER), parent))
        if drop_incoming:
            for fk in shape.incoming:
                conn.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                        qualified(fk.schema_name, fk.table_name), sql.Identifier(fk.name)
                    )
                )
        for col in sorted(shape.identity):
            # The copy's own identity sequence continues exactly where the table's stopped, and takes its name.
            names = {"new": _regname(schema, shadow), "old": _regname(schema, table), "col": col}
            row = conn.execute(
                "SELECT o.oid, on_.nspname, o.relname, nn.nspname, n.relname FROM pg_class o "
                "JOIN pg_namespace on_ ON on_.oid = o.relnamespace, pg_class n "
                "JOIN pg_namespace nn ON nn.oid = n.relnamespace WHERE "
                "o.oid = pg_get_serial_sequence(%(old)s, %(col)s)::regclass AND "
                "n.oid = pg_get_serial_sequence(%(new)s, %(col)s)::regclass",
                names,
            ).fetchone()
            if row is None:
                continue
            last = conn.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(qualified(row[1], row[2]))
            ).fetchone()
            assert last is not None
            conn.execute("SELECT setval(%s::regclass, %s, %s)", (_regname(row[3], row[4]), last[0], last[1]))
            conn.execute(
                sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
                    qualified(row[1], row[2]), _temp_name("oldseq", row[0])
                )
            )
            conn.execute(
                sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(qualified(row[3], row[4]), sql.Identifier(row[2]))
            )
        for sequence, col in shape.owned_sequences:
            conn.execute(
                sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(sql.SQL(sequence), target, sql.Identifier(col))
            )  # sequence is quote_ident() output from the catalog
        for index in shape.indexes:
            stale = _temp_name("old", index.oid)
            fresh = _temp_name("con" if index.constraint_type in ("p", "u") else "idx", index.oid)
            if index.constraint_type in ("p", "u"):
                conn.execute(
                    sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                        parent, sql.Identifier(index.constraint or index.name), stale
                    )
                )
                conn.execute(
                    sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                        target, fresh, sql.Identifier(index.constraint or index.name)
                    )
                )
            else:
                conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(qualified(schema, index.name), stale))
                conn.execute(
                    sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.SQL("{}.{}").format(sql.Identifier(schema), fresh), sql.Identifier(index.name)
                    )
                )
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(parent, sql.Identifier(old)))
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(target, sql.Identifier(table)))
        update_state(subject, phase="swapped")
        if checkpoint is not None:
            checkpoint("swap-before-commit")
    held = int((time.monotonic() - locked) * 1000)
    note_lock(subject, held)
    return held


def _regname(schema: str, table: str) -> str:
    """A table name as text that regclass input parses back exactly (for pg_get_serial_sequence)."""
    return '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'


def cleanup(subject: Subject, oid: int, *, keep_old: bool, lock_timeout_ms: int) -> None:
    """After the swap: drop the verified old table (unless kept) and the trigger functions; mark done."""
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        if not keep_old:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(schema, old_name(table))))
        _drop_helpers(conn, state_schema, oid)
        update_state(subject, phase="done", finished_at=_now(conn), cursor=None)


def _drop_helpers(conn: psycopg.Connection, state_schema: str, oid: int) -> None:
    """The trigger functions and the change log of the conversion of the table with this oid."""
    for fn in (f"partition_sync_{oid}", f"partition_sync_truncate_{oid}"):
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}.{}()").format(sql.Identifier(state_schema), sql.Identifier(fn))
        )
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(state_schema, f"partition_log_{oid}")))


def _now(conn: psycopg.Connection) -> Any:
    row = conn.execute("SELECT now()").fetchone()
    return row[0] if row else None


def abort(
    subject: Subject,
    lock_timeout_ms: int,
    *,
    locked: bool = False,
) -> bool | None:
    """Undo an unfinished conversion before its swap: trigger first (the application's writes use it), then
    the copy, the log and the trigger functions.

    True when something was undone, False when there was nothing to undo, None when a conversion run
    (the operator's or a CronJob's) holds the table right now: try again shortly.
    """
    conn, state_schema, schema, table = subject.conn, subject.state_schema, subject.schema, subject.table
    if not locked:
        if not try_lock(conn, schema, table):
            return None
        try:
            return abort(subject, lock_timeout_ms, locked=True)
        finally:
            unlock(conn, schema, table)
    state = load_state(subject)
    if state is None or state.phase in ("swapped", "done"):
        return False
    parent = qualified(schema, table)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        row = conn.execute(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (schema, table),
        ).fetchone()
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER), parent))
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRUNCATE_TRIGGER), parent))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(schema, state.shadow)))
        if row:
            _drop_helpers(conn, state_schema, int(row[0]))
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE table_schema = %s AND table_name = %s").format(_state(state_schema)),
            (schema, table),
        )
    return True


def manual_abort(state_schema: str, schema: str, table: str) -> str:
    """The SQL that undoes an unfinished conversion by hand (what ``abort`` does), for a person to run."""
    text = sql.SQL(
        "DROP TRIGGER IF EXISTS {trigger} ON {parent}; DROP TRIGGER IF EXISTS {truncate} ON {parent}; "
        "DROP TABLE IF EXISTS {shadow}; then, with <oid> = SELECT {name}::regclass::oid: DROP FUNCTION IF EXISTS "
        "{state}.partition_sync_<oid>(), {state}.partition_sync_truncate_<oid>(); DROP TABLE IF EXISTS "
        "{state}.partition_log_<oid>; DELETE FROM {states} WHERE table_schema = {schema} AND table_name = {table}"
    ).format(
        trigger=sql.Identifier(TRIGGER),
        truncate=sql.Identifier(TRUNCATE_TRIGGER),
        parent=qualified(schema, table),
        shadow=qualified(schema, shadow_name(table)),
        name=sql.Literal(qualified(schema, table).as_string(None)),
        state=sql.Identifier(state_schema),
        states=_state(state_schema),
        schema=sql.Literal(schema),
        table=sql.Literal(table),
    )
    return text.as_string(None)


def estimate_rows(conn: psycopg.Connection, schema: str, table: str) -> int | None:
    row = conn.execute(
        "SELECT c.reltuples::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    if row and row[0] is not None and row[0] >= 0:
        return int(row[0])
    counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(qualified(schema, table))).fetchone()
    return int(counted[0]) if counted else None  # never analyzed: count once (reads, blocks nobody)
