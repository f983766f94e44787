"""SQL of converting a live table into a range-partitioned one (copy + sync trigger, then a swap).

How it stays online and exact:

1. *prepare* (one transaction): a partitioned shadow table ``<table>_pgscale_new`` with
   the table's columns, defaults, identity, CHECK/NOT NULL constraints, comments,
   grants, owner, primary key, unique constraints, indexes and outgoing foreign keys,
   its partitions, and a trigger on the table that mirrors every INSERT, UPDATE,
   DELETE and TRUNCATE into the shadow in the writer's own transaction. Only the
   CREATE TRIGGER, last, locks the table (SHARE ROW EXCLUSIVE, for milliseconds).
2. *copy*: committed batches in primary-key order, each reading its rows FOR SHARE
   (a row deleted meanwhile is skipped, an updated one is read in its latest version)
   and inserting them with ON CONFLICT DO NOTHING (a row the trigger already mirrored
   wins). The cursor is committed with each batch.
3. *verify*: one REPEATABLE READ snapshot counts and checksums both tables. The
   trigger writes in the writer's transaction, so any snapshot sees both alike.
4. *swap* (one transaction, ACCESS EXCLUSIVE on the table under ``lock_timeout``):
   drop the trigger, hand over sequences, swap index/constraint names and table names.
5. *cleanup*: drop the old table (it was verified) unless asked to keep it.

Every statement text comes from this module; names from specs go through
``sql.Identifier``, values are parameters or ``sql.Literal``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from . import ensure_state_table, qualified

STATE_TABLE = "partition_conversions"
STATE_DEFINITION = (
    "table_schema text NOT NULL, table_name text NOT NULL, phase text NOT NULL, shadow text NOT NULL, "
    "cursor text[], rows_total bigint, rows_copied bigint NOT NULL DEFAULT 0, "
    "copy_started_at timestamptz, longest_lock_ms integer NOT NULL DEFAULT 0, lock_retries integer NOT NULL "
    "DEFAULT 0, verified_rows bigint, message text, started_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz, PRIMARY KEY (table_schema, table_name)"
)
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
        "SELECT attname, format_type(atttypid, atttypmod), attgenerated <> '', attidentity <> '' "
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
        "AND con.contype IN ('p', 'u', 'x') WHERE i.indrelid = %s ORDER BY ic.relname",
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
        value = sql.SQL("{}({})").format(sql.SQL(agg), col)
        if column_type.startswith("timestamp with"):
            return sql.SQL("({} AT TIME ZONE {})::date").format(value, sql.Literal(time_zone))
        return sql.SQL("{}::date").format(value)

    lo, hi = day("min"), day("max")
    row = conn.execute(sql.SQL("SELECT {}, {} FROM {}").format(lo, hi, qualified(schema, table))).fetchone()
    return (row[0], row[1]) if row else (None, None)


# --- state ------------------------------------------------------------------------------------------


@dataclass
class State:
    """One conversion's bookkeeping row."""

    phase: str  # prepared, copied, verified, swapped, done
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


def _state(state_schema: str) -> sql.Composed:
    return qualified(state_schema, STATE_TABLE)


def ensure_state(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(conn, state_schema, STATE_TABLE, STATE_DEFINITION)


def load_state(conn: psycopg.Connection, state_schema: str, schema: str, table: str) -> State | None:
    exists = conn.execute("SELECT to_regclass(%s)", (f'"{state_schema}"."{STATE_TABLE}"',)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT phase, shadow, cursor, rows_total, rows_copied, copy_started_at, longest_lock_ms, lock_retries, "
            "verified_rows, message, started_at, updated_at, finished_at FROM {} "
            "WHERE table_schema = %s AND table_name = %s"
        ).format(_state(state_schema)),
        (schema, table),
    ).fetchone()
    return State(*row) if row else None


def update_state(conn: psycopg.Connection, state_schema: str, schema: str, table: str, **fields: Any) -> None:
    """Set columns of the state row (names are this module's, values are parameters)."""
    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields)
    conn.execute(
        sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE table_schema = %s AND table_name = %s").format(
            _state(state_schema), sets
        ),
        (*fields.values(), schema, table),
    )


def note_lock(conn: psycopg.Connection, state_schema: str, schema: str, table: str, held_ms: int) -> None:
    conn.execute(
        sql.SQL(
            "UPDATE {} SET longest_lock_ms = greatest(longest_lock_ms, %s) WHERE table_schema = %s AND table_name = %s"
        ).format(_state(state_schema)),
        (held_ms, schema, table),
    )


def note_retry(conn: psycopg.Connection, state_schema: str, schema: str, table: str) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET lock_retries = lock_retries + 1 WHERE table_schema = %s AND table_name = %s").format(
            _state(state_schema)
        ),
        (schema, table),
    )


def forget_state(conn: psycopg.Connection, state_schema: str, schema: str, table: str) -> None:
    if load_state(conn, state_schema, schema, table) is not None:
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
    conn.execute("SELECT pg_advisory_unlock(hashtextextended('pgscale.partition:' || %s || '.' || %s, 0))",
                 (schema, table))  # fmt: skip


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


def sync_function(state_schema: str, shape: Shape, schema: str, shadow: str) -> tuple[sql.Composed, sql.Composed]:
    """The row trigger function and the TRUNCATE one that keep the shadow equal to the table."""
    fn = sql.Identifier(f"partition_sync_{shape.oid}")
    tfn = sql.Identifier(f"partition_sync_truncate_{shape.oid}")
    target = qualified(schema, shadow)
    cols = [c for c in shape.columns if c not in shape.generated]
    override = sql.SQL(" OVERRIDING SYSTEM VALUE") if shape.identity else sql.SQL("")
    match = sql.SQL(" AND ").join(sql.SQL("{c} = OLD.{c}").format(c=sql.Identifier(c)) for c in shape.primary_key)
    body = sql.SQL(
        "BEGIN IF TG_OP IN ('UPDATE', 'DELETE') THEN DELETE FROM {t} WHERE {m}; END IF; "
        "IF TG_OP IN ('INSERT', 'UPDATE') THEN INSERT INTO {t} ({cols}){o} VALUES ({vals}); END IF; "
        "RETURN NULL; END"
    ).format(
        t=target, m=match, cols=_key_list(cols), o=override,
        vals=sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(c)) for c in cols),
    )  # fmt: skip
    # SECURITY DEFINER: the application's roles write through the trigger without any privilege on the
    # copy (an UPDATE becomes a DELETE and an INSERT there); a fixed search_path keeps it safe.
    definer = "RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {}"
    row_fn = sql.SQL("CREATE FUNCTION {}.{}() " + definer).format(
        sql.Identifier(state_schema), fn, sql.Literal(body.as_string(None))
    )
    trunc_body = sql.SQL("BEGIN TRUNCATE {}; RETURN NULL; END").format(target)
    trunc_fn = sql.SQL("CREATE FUNCTION {}.{}() " + definer).format(
        sql.Identifier(state_schema), tfn, sql.Literal(trunc_body.as_string(None))
    )
    return row_fn, trunc_fn


def prepare(
    conn: psycopg.Connection,
    state_schema: str,
    schema: str,
    table: str,
    column: str,
    shape: Shape,
    partitions: list[Bounds],
    default_name: str,
    widen: bool,
    rows_total: int | None,
    lock_timeout_ms: int,
) -> int:
    """Build the shadow and install the sync trigger, in one transaction. Returns ms the table was locked."""

    shadow = shadow_name(table)
    parent, target = qualified(schema, table), qualified(schema, shadow)
    ensure_state(conn, state_schema)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE {} INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING CONSTRAINTS "
                "INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING IDENTITY INCLUDING STATISTICS INCLUDING STORAGE) "
                "PARTITION BY RANGE ({})"
            ).format(target, parent, sql.Identifier(column))
        )
        for part in partitions:
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                    qualified(schema, part.name), target, part.lower, part.upper
                )
            )
        conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(qualified(schema, default_name), target))
        for index in shape.indexes:
            if index.constraint_type in ("p", "u"):
                # The key as the catalog states it (INCLUDE, DEFERRABLE, NULLS NOT DISTINCT kept), or widened.
                definition = index.condef if column in index.columns or not widen else index.widened(column)
                assert definition is not None  # blockers() refused keys that cannot be widened
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                        target,
                        _temp_name("con", index.oid),
                        sql.SQL(definition),  # catalog text
                    )
                )
            else:
                conn.execute(_index_statement(index, schema, shadow))
        if shape.comment is not None:
            conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(target, sql.Literal(shape.comment)))
        owner = conn.execute("SELECT current_user").fetchone()
        if owner and owner[0] != shape.owner:
            for name in [shadow, default_name, *(p.name for p in partitions)]:
                conn.execute(
                    sql.SQL("ALTER TABLE {} OWNER TO {}").format(qualified(schema, name), sql.Identifier(shape.owner))
                )
        for grantee, privilege, grantable in shape.acl:
            if privilege in PRIVILEGES:
                conn.execute(
                    sql.SQL("GRANT {} ON {} TO {}{}").format(
                        sql.SQL(privilege), target,
                        sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                        sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                    )
                )  # fmt: skip
        for col, grantee, privilege, grantable in shape.column_acl:
            if privilege in PRIVILEGES:
                conn.execute(
                    sql.SQL("GRANT {} ({}) ON {} TO {}{}").format(
                        sql.SQL(privilege), sql.Identifier(col), target,
                        sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
                        sql.SQL(" WITH GRANT OPTION" if grantable else ""),
                    )
                )  # fmt: skip
        for fk in shape.outgoing:
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    target, sql.Identifier(fk.name), sql.SQL(fk.definition)
                )
            )
        row_fn, trunc_fn = sync_function(state_schema, shape, schema, shadow)
        conn.execute(row_fn)
        conn.execute(trunc_fn)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_schema, table_name, phase, shadow, rows_total) VALUES (%s, %s, 'prepared', "
                "%s, %s) ON CONFLICT (table_schema, table_name) DO UPDATE SET phase = 'prepared', shadow = "
                "EXCLUDED.shadow, rows_total = EXCLUDED.rows_total, cursor = NULL, rows_copied = 0, "
                "copy_started_at = NULL, verified_rows = NULL, message = NULL, started_at = now(), "
                "updated_at = now(), finished_at = NULL"
            ).format(_state(state_schema)),
            (schema, table, shadow, rows_total),
        )
        # Last: the only statements that lock the table, held until the commit right after. The time
        # counted includes the wait, during which later lockers of the table queue behind this one.
        locked = time.monotonic()
        conn.execute(
            sql.SQL("CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}.{}()")
            .format(sql.Identifier(TRIGGER), parent, sql.Identifier(state_schema),
                    sql.Identifier(f"partition_sync_{shape.oid}"))
        )  # fmt: skip
        conn.execute(
            sql.SQL("CREATE TRIGGER {} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.{}()").format(
                sql.Identifier(TRUNCATE_TRIGGER), parent, sql.Identifier(state_schema),
                sql.Identifier(f"partition_sync_truncate_{shape.oid}"),
            )
        )  # fmt: skip
    held = int((time.monotonic() - locked) * 1000)
    note_lock(conn, state_schema, schema, table, held)
    return held


# --- copy ---------------------------------------------------------------------------------------------


def copy_batch(
    conn: psycopg.Connection,
    state_schema: str,
    schema: str,
    table: str,
    shape: Shape,
    cursor: list[str] | None,
    batch_size: int,
    lock_timeout_ms: int,
) -> tuple[int, list[str] | None]:
    """Copy the next batch in key order and commit it with the cursor. Returns (rows read, new cursor)."""
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
        "WITH src AS MATERIALIZED (SELECT {cols} FROM {t} {after} ORDER BY {key} LIMIT {n} FOR SHARE), "
        "ins AS (INSERT INTO {s} ({cols}){o} SELECT {cols} FROM src ON CONFLICT DO NOTHING RETURNING 1) "
        "SELECT (SELECT count(*) FROM src), (SELECT ARRAY[{last}] FROM src ORDER BY {order} LIMIT 1), "
        "(SELECT count(*) FROM ins)"
    ).format(
        cols=_key_list(cols), t=qualified(schema, table), after=after, key=_key_list(key),
        n=sql.Literal(batch_size), s=qualified(schema, shadow),
        o=sql.SQL(" OVERRIDING SYSTEM VALUE") if shape.identity else sql.SQL(""),
        last=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key), order=order,
    )  # fmt: skip
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        row = conn.execute(statement).fetchone()
        assert row is not None
        read, last = int(row[0]), (list(row[1]) if row[1] is not None else cursor)
        update_state(conn, state_schema, schema, table, cursor=last)
        conn.execute(
            sql.SQL(
                "UPDATE {} SET rows_copied = rows_copied + %s, copy_started_at = coalesce(copy_started_at, now()) "
                "WHERE table_schema = %s AND table_name = %s"
            ).format(_state(state_schema)),
            (read, schema, table),
        )
    return read, last


# --- verify -------------------------------------------------------------------------------------------


def _fingerprint(conn: psycopg.Connection, target: sql.Composable, columns: list[str]) -> tuple[int, int]:
    row_text = sql.SQL("ROW({})::text").format(_key_list(columns))
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || left(md5({}), 16))::bit(64)::bigint::numeric), 0) FROM {}"
        ).format(row_text, target)
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def verify(conn: psycopg.Connection, schema: str, table: str, shape: Shape) -> tuple[tuple[int, int], tuple[int, int]]:
    """Count and checksum of the table and of the shadow, in one snapshot (no locks that block writers)."""
    with conn.transaction(force_rollback=True):
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        source = _fingerprint(conn, qualified(schema, table), shape.columns)
        copy = _fingerprint(conn, qualified(schema, shadow_name(table)), shape.columns)
    return source, copy


# --- swap and cleanup ----------------------------------------------------------------------------------


def swap(
    conn: psycopg.Connection,
    state_schema: str,
    schema: str,
    table: str,
    shape: Shape,
    drop_incoming: bool,
    lock_timeout_ms: int,
    checkpoint: Any = None,
) -> int:
    """Put the partitioned table in the table's place, in one transaction. Returns ms the table was locked."""

    shadow, old = shadow_name(table), old_name(table)
    parent, target = qualified(schema, table), qualified(schema, shadow)
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        locked = time.monotonic()
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(parent))
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(target))
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
            # The shadow's own identity sequence continues where the table's stopped, and takes its name.
            names = {"new": _regname(schema, shadow), "old": _regname(schema, table), "col": col}
            conn.execute(
                "SELECT setval(pg_get_serial_sequence(%(new)s, %(col)s), s.last_value, true) "
                "FROM pg_sequences s WHERE (quote_ident(s.schemaname) || '.' || quote_ident(s.sequencename)) = "
                "pg_get_serial_sequence(%(old)s, %(col)s) AND s.last_value IS NOT NULL",
                names,
            )
            row = conn.execute(
                "SELECT o.oid, o.relname, n.relname FROM pg_class o, pg_class n WHERE "
                "o.oid = pg_get_serial_sequence(%(old)s, %(col)s)::regclass AND "
                "n.oid = pg_get_serial_sequence(%(new)s, %(col)s)::regclass",
                names,
            ).fetchone()
            if row:
                conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
                    qualified(schema, row[1]), _temp_name("oldseq", row[0])))  # fmt: skip
                conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
                    qualified(schema, row[2]), sql.Identifier(row[1])))  # fmt: skip
        for sequence, col in shape.owned_sequences:
            conn.execute(
                sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(sql.SQL(sequence), target, sql.Identifier(col))
            )  # sequence is quote_ident() output from the catalog
        for index in shape.indexes:
            stale = _temp_name("old", index.oid)
            fresh = _temp_name("con" if index.constraint_type in ("p", "u") else "idx", index.oid)
            if index.constraint_type in ("p", "u"):
                conn.execute(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                    parent, sql.Identifier(index.constraint or index.name), stale))  # fmt: skip
                conn.execute(sql.SQL("ALTER TABLE {} RENAME CONSTRAINT {} TO {}").format(
                    target, fresh, sql.Identifier(index.constraint or index.name)))  # fmt: skip
            else:
                conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    qualified(schema, index.name), stale))  # fmt: skip
                conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    sql.SQL("{}.{}").format(sql.Identifier(schema), fresh), sql.Identifier(index.name)))  # fmt: skip
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(parent, sql.Identifier(old)))
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(target, sql.Identifier(table)))
        update_state(conn, state_schema, schema, table, phase="swapped")
        if checkpoint is not None:
            checkpoint("swap-before-commit")
    held = int((time.monotonic() - locked) * 1000)
    note_lock(conn, state_schema, schema, table, held)
    return held


def _regname(schema: str, table: str) -> str:
    """A table name as text that regclass input parses back exactly (for pg_get_serial_sequence)."""
    return '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'


def cleanup(
    conn: psycopg.Connection, state_schema: str, schema: str, table: str, oid: int, keep_old: bool,
    lock_timeout_ms: int,
) -> None:  # fmt: skip
    """After the swap: drop the verified old table (unless kept) and the trigger functions; mark done."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
        if not keep_old:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(schema, old_name(table))))
        for fn in (f"partition_sync_{oid}", f"partition_sync_truncate_{oid}"):
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}.{}()").format(sql.Identifier(state_schema),
                                                                          sql.Identifier(fn)))  # fmt: skip
        update_state(conn, state_schema, schema, table, phase="done", finished_at=_now(conn), cursor=None)


def _now(conn: psycopg.Connection) -> Any:
    row = conn.execute("SELECT now()").fetchone()
    return row[0] if row else None


def abort(
    conn: psycopg.Connection, state_schema: str, schema: str, table: str, lock_timeout_ms: int, *,
    locked: bool = False,
) -> bool | None:  # fmt: skip
    """Undo an unfinished conversion before its swap: trigger first (the application's writes use it), then shadow.

    True when something was undone, False when there was nothing to undo, None when a conversion run
    (the operator's or a CronJob's) holds the table right now: try again shortly.
    """
    if not locked:
        if not try_lock(conn, schema, table):
            return None
        try:
            return abort(conn, state_schema, schema, table, lock_timeout_ms, locked=True)
        finally:
            unlock(conn, schema, table)
    state = load_state(conn, state_schema, schema, table)
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
            for fn in (f"partition_sync_{row[0]}", f"partition_sync_truncate_{row[0]}"):
                conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}.{}()").format(
                    sql.Identifier(state_schema), sql.Identifier(fn)))  # fmt: skip
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE table_schema = %s AND table_name = %s").format(_state(state_schema)),
            (schema, table),
        )
    return True


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


def dumps(value: Any) -> str:
    return json.dumps(value, default=str)
