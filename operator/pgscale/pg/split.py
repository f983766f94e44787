"""SQL of a DatabaseSplit: checks, the tables' definitions, logical replication both ways, the cutover.

How the split stays online and exact:

1. *prepare* changes nothing until every check passed: wal_level, the replication privilege,
   replica identity per table, foreign keys across the cut, target tables that exist with
   other columns.
2. *schema*: the moved tables are created on the target from the source's catalog (enums and
   domains first, sequences, columns with defaults and identity, keys, checks, foreign keys
   among the moved tables, indexes, comments, grants to roles that exist there), in one
   transaction, each with the read-only guard trigger (see below).
3. *replicate*: a publication on the source and a subscription on the target (initial copy,
   then streaming). pgscale creates the slot itself before the subscription, so a crash
   between the two leaves a slot it finds by name (and source and target may share a server).
4. *cutover* (one transaction on the source holding ``LOCK ... IN EXCLUSIVE MODE``: reads go on,
   writes wait): the source's WAL position is read, the subscription is awaited until its slot
   confirmed that position, the subscription is disabled, the target's sequences are set past
   the source's, counts and checksums are compared, the reverse slot is created on the target,
   and the source tables get the guard trigger in the same transaction. Then the target's guard
   is dropped, and the forward subscription is replaced by a reverse one (copy_data = false) on
   the already created slot, so nothing the application writes to the target is missed.
   Rollback is the same with the sides swapped.

The guard is an ordinary statement trigger (``ENABLE ORIGIN``, the default) raising SQLSTATE
25006 (read_only_sql_transaction): the application's writes fail, while replication's apply
workers (session_replication_role = replica) are not affected. Dropping the trigger
(``DROP TRIGGER pgscale_split_readonly ON ...``) makes a table writable again.

Every statement text comes from this module; names go through ``sql.Identifier``, values are
parameters or ``sql.Literal``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..errors import TransientError
from . import ensure_schema, ensure_state_table, qualified

STATE_TABLE = "database_splits"
STATE_DEFINITION = (
    "split text PRIMARY KEY, step text NOT NULL, writes_to text NOT NULL DEFAULT 'source', "
    "longest_block_ms integer NOT NULL DEFAULT 0, lock_retries integer NOT NULL DEFAULT 0, "
    "last_direction text, last_block_ms integer, last_rows bigint, last_at timestamptz, "
    "copy_started_at timestamptz, started_at timestamptz NOT NULL DEFAULT now(), "
    "updated_at timestamptz NOT NULL DEFAULT now()"
)
GUARD_TRIGGER = "pgscale_split_readonly"
GUARD_FUNCTION = "pgscale_split_guard"
SEQUENCE_GAP = 1000  # a cutover sets each sequence this far past the other side's value
READY_STATES = {"r": "ready", "s": "syncing", "f": "copied", "d": "copying", "i": "init"}
Table = tuple[str, str]  # (schema, name)


@dataclass(frozen=True)
class Names:
    """The replication objects of one split; the same on every run, from its namespace and name."""

    publication: str
    forward: str  # subscription on the target, and its slot on the source
    reverse: str  # subscription on the source, and its slot on the target

    @classmethod
    def of(cls, key: str) -> Names:
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        base = f"pgscale_split_{digest}"
        return cls(publication=base, forward=f"{base}_fwd", reverse=f"{base}_rev")


def sql_name(identifier: str) -> str:
    """An identifier as SQL needs it written: quoted only when it must be (for messages and their fixes)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", identifier):
        return identifier
    return '"' + identifier.replace('"', '""') + '"'


def label(table: Table) -> str:
    """schema.table, as SQL would write it, for messages."""
    return f"{sql_name(table[0])}.{sql_name(table[1])}"


# --- state row ---------------------------------------------------------------------------------------


@dataclass
class State:
    step: str
    writes_to: str
    longest_block_ms: int
    lock_retries: int
    last_direction: str | None
    last_block_ms: int | None
    last_rows: int | None
    last_at: Any
    copy_started_at: Any


def ensure_state(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(conn, state_schema, STATE_TABLE, STATE_DEFINITION)


def load_state(conn: psycopg.Connection, state_schema: str, split: str) -> State | None:
    exists = conn.execute("SELECT to_regclass(%s)", (qualified(state_schema, STATE_TABLE).as_string(conn),)).fetchone()
    if not exists or exists[0] is None:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT step, writes_to, longest_block_ms, lock_retries, last_direction, last_block_ms, last_rows, "
            "last_at, copy_started_at FROM {} WHERE split = %s"
        ).format(qualified(state_schema, STATE_TABLE)),
        (split,),
    ).fetchone()
    return State(*row) if row else None


def save_state(conn: psycopg.Connection, state_schema: str, split: str, **fields: Any) -> None:
    """Update the split's state row, or insert it (the first time, with its step); column names are this
    module's, values are parameters."""
    names = list(fields)
    table = qualified(state_schema, STATE_TABLE)
    sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(n)) for n in names)
    cur = conn.execute(
        sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE split = %s").format(table, sets), (*fields.values(), split)
    )
    if cur.rowcount == 0:
        conn.execute(
            sql.SQL("INSERT INTO {} (split, {}) VALUES (%s, {})").format(
                table,
                sql.SQL(", ").join(map(sql.Identifier, names)),
                sql.SQL(", ").join(sql.Placeholder() * len(names)),
            ),
            (split, *fields.values()),
        )


def note_retry(conn: psycopg.Connection, state_schema: str, split: str) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET lock_retries = lock_retries + 1 WHERE split = %s").format(
            qualified(state_schema, STATE_TABLE)
        ),
        (split,),
    )


def forget_state(conn: psycopg.Connection, state_schema: str, split: str) -> None:
    if load_state(conn, state_schema, split) is not None:
        conn.execute(sql.SQL("DELETE FROM {} WHERE split = %s").format(qualified(state_schema, STATE_TABLE)), (split,))


def try_lock(conn: psycopg.Connection, split: str) -> bool:
    """One run of a split at a time (a session lock: a killed run frees it)."""
    row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended('pgscale.split:' || %s, 0))", (split,)).fetchone()
    return bool(row and row[0])


def unlock(conn: psycopg.Connection, split: str) -> None:
    """Release it; on a dead connection the lock died with the session, and raising would hide the first error."""
    if conn.closed or conn.broken:
        return
    with contextlib.suppress(psycopg.Error):
        conn.execute("SELECT pg_advisory_unlock(hashtextextended('pgscale.split:' || %s, 0))", (split,))


# --- which tables ------------------------------------------------------------------------------------


def schema_tables(conn: psycopg.Connection, schema: str) -> list[Table]:
    """The plain and partitioned tables of a schema (not partitions), by name."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY c.relname",
        (schema,),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def missing_tables(conn: psycopg.Connection, tables: list[Table]) -> list[Table]:
    return [t for t in tables if table_oid(conn, t) is None]


def table_oid(conn: psycopg.Connection, table: Table) -> int | None:
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        table,
    ).fetchone()
    return int(row[0]) if row else None


# --- prepare checks ----------------------------------------------------------------------------------


def wal_level(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT current_setting('wal_level')").fetchone()
    return str(row[0]) if row else ""


def can_replicate(conn: psycopg.Connection) -> bool:
    """Whether the connected role may stream changes: REPLICATION, superuser, or a managed service's
    equivalent (rds_replication on Amazon RDS and Aurora)."""
    row = conn.execute(
        "SELECT r.rolsuper OR r.rolreplication OR EXISTS (SELECT 1 FROM pg_roles m WHERE m.rolname = "
        "'rds_replication' AND pg_has_role(current_user, m.oid, 'member')) FROM pg_roles r "
        "WHERE r.rolname = current_user"
    ).fetchone()
    return bool(row and row[0])


def can_subscribe(conn: psycopg.Connection) -> bool:
    """Whether the connected role may CREATE SUBSCRIPTION: superuser, or pg_create_subscription (16+)."""
    row = conn.execute(
        "SELECT r.rolsuper OR EXISTS (SELECT 1 FROM pg_roles m WHERE m.rolname = 'pg_create_subscription' "
        "AND pg_has_role(current_user, m.oid, 'member')) FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()
    return bool(row and row[0])


def without_identity(conn: psycopg.Connection, tables: list[Table]) -> list[Table]:
    """Tables whose UPDATEs and DELETEs logical replication cannot carry: no primary key and no explicit
    REPLICA IDENTITY (USING INDEX or FULL)."""
    out = []
    for table in tables:
        row = conn.execute(
            "SELECT c.relreplident, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND "
            "(i.indisprimary OR i.indisreplident)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            table,
        ).fetchone()
        if row is None:
            continue
        ident, keyed = row
        if ident == "n" or (ident in ("d", "i") and not keyed):
            out.append(table)
    return out


@dataclass(frozen=True)
class CrossKey:
    """A foreign key between a moved and an unmoved table."""

    name: str
    table: Table  # the referencing table
    references: Table
    outgoing: bool  # True: a moved table references an unmoved one

    def describe(self) -> str:
        return f"{self.name!r} on {label(self.table)} references {label(self.references)}"

    def drop_sql(self) -> str:
        return f"ALTER TABLE {label(self.table)} DROP CONSTRAINT {sql_name(self.name)}"


def partitioned(conn: psycopg.Connection, tables: list[Table]) -> list[Table]:
    out = []
    for table in tables:
        row = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s", (table_oid(conn, table),)).fetchone()
        if row and row[0] == "p":
            out.append(table)
    return out


def cross_keys(conn: psycopg.Connection, tables: list[Table]) -> list[CrossKey]:
    """Foreign keys crossing the cut, both directions."""
    moved = {label(t) for t in tables}
    rows = conn.execute(
        "SELECT con.conname, sn.nspname, sc.relname, tn.nspname, tc.relname FROM pg_constraint con "
        "JOIN pg_class sc ON sc.oid = con.conrelid JOIN pg_namespace sn ON sn.oid = sc.relnamespace "
        "JOIN pg_class tc ON tc.oid = con.confrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace "
        "WHERE con.contype = 'f' AND (sn.nspname, sc.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
        "OR con.contype = 'f' AND (tn.nspname, tc.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
        "ORDER BY 1",
        ([t[0] for t in tables], [t[1] for t in tables]) * 2,
    ).fetchall()
    out = []
    for name, s_schema, s_table, t_schema, t_table in rows:
        src, dst = (s_schema, s_table), (t_schema, t_table)
        if (label(src) in moved) != (label(dst) in moved):
            out.append(CrossKey(name, src, dst, outgoing=label(src) in moved))
    return out


def columns(conn: psycopg.Connection, table: Table) -> list[tuple[str, str]]:
    """(name, type) of the live columns, in order."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (table_oid(conn, table),),
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def differing_targets(source: psycopg.Connection, target: psycopg.Connection, tables: list[Table]) -> list[str]:
    """Target tables that exist with other columns than the source's, each with what differs."""
    out = []
    for table in tables:
        if table_oid(target, table) is None:
            continue
        mine, theirs = columns(source, table), columns(target, table)
        if sorted(mine) != sorted(theirs):
            extra = [f"{n} {t}" for n, t in theirs if (n, t) not in mine]
            lacking = [f"{n} {t}" for n, t in mine if (n, t) not in theirs]
            out.append(
                f"{label(table)} exists on the target with other columns (target only: "
                f"{', '.join(extra) or 'none'}; source only: {', '.join(lacking) or 'none'}); "
                f"drop it there (DROP TABLE {label(table)}) or make its columns the source's"
            )
    return out


def has_rows(conn: psycopg.Connection, table: Table) -> bool:
    row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(qualified(*table))).fetchone()
    return bool(row and row[0])


# --- the tables' definitions -------------------------------------------------------------------------


@dataclass
class Definitions:
    """Statements that create the moved tables on the target, in order, with what each creates."""

    statements: list[tuple[str, str]] = field(default_factory=list)  # (kind:name, SQL)

    def add(self, what: str, statement: str) -> None:
        self.statements.append((what, statement))


def _q(*parts: str) -> str:
    return ".".join(sql.Identifier(p).as_string(None) for p in parts)


def definitions(conn: psycopg.Connection, tables: list[Table], *, skip_cross_keys: bool) -> Definitions:
    """The DDL of the moved tables, from the source's catalog (pg_get_* texts, names quoted)."""
    out = Definitions()
    oids = [table_oid(conn, t) for t in tables]
    schemas = sorted({t[0] for t in tables})
    for schema in schemas:
        out.add(f"schema:{schema}", f"CREATE SCHEMA IF NOT EXISTS {_q(schema)}")
    _types(conn, oids, out)
    for table, oid in zip(tables, oids, strict=True):
        _sequences(conn, oid, out)
        _table(conn, table, oid, out)
    moved = {label(t) for t in tables}
    keys = Definitions()  # foreign keys last: the keys they reference exist by then
    for table, oid in zip(tables, oids, strict=True):
        for name, contype, condef, ref_schema, ref_table in conn.execute(
            "SELECT con.conname, con.contype, pg_get_constraintdef(con.oid), rn.nspname, rc.relname "
            "FROM pg_constraint con LEFT JOIN pg_class rc ON rc.oid = con.confrelid "
            "LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace "
            "WHERE con.conrelid = %s AND con.contype IN ('p', 'u', 'c', 'x', 'f') "
            "ORDER BY con.contype = 'f', con.conname",
            (oid,),
        ).fetchall():
            if contype == "f" and label((ref_schema, ref_table)) not in moved and skip_cross_keys:
                continue
            (keys if contype == "f" else out).add(
                f"constraint:{name}",
                f"ALTER TABLE {_q(*table)} ADD CONSTRAINT {_q(name)} {condef}",
            )
        for name, indexdef in conn.execute(
            "SELECT ic.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class ic "
            "ON ic.oid = i.indexrelid WHERE i.indrelid = %s AND NOT EXISTS (SELECT 1 FROM pg_constraint con "
            "WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid) ORDER BY ic.relname",
            (oid,),
        ).fetchall():
            out.add(f"index:{name}", indexdef)
        ident = conn.execute(
            "SELECT c.relreplident, ic.relname FROM pg_class c LEFT JOIN pg_index i ON i.indrelid = c.oid "
            "AND i.indisreplident LEFT JOIN pg_class ic ON ic.oid = i.indexrelid WHERE c.oid = %s",
            (oid,),
        ).fetchone()
        if ident and ident[0] == "f":
            out.add("identity:full", f"ALTER TABLE {_q(*table)} REPLICA IDENTITY FULL")
        elif ident and ident[0] == "i" and ident[1]:
            out.add("identity:index", f"ALTER TABLE {_q(*table)} REPLICA IDENTITY USING INDEX {_q(ident[1])}")
        comment = conn.execute("SELECT obj_description(%s, 'pg_class')", (oid,)).fetchone()
        if comment and comment[0] is not None:
            out.add("comment", f"COMMENT ON TABLE {_q(*table)} IS {sql.Literal(comment[0]).as_string(conn)}")
        for col, text in conn.execute(
            "SELECT a.attname, col_description(a.attrelid, a.attnum) FROM pg_attribute a WHERE a.attrelid = %s "
            "AND a.attnum > 0 AND NOT a.attisdropped AND col_description(a.attrelid, a.attnum) IS NOT NULL",
            (oid,),
        ).fetchall():
            out.add(
                "comment",
                f"COMMENT ON COLUMN {_q(*table, col)} IS {sql.Literal(text).as_string(conn)}",
            )
        for grantee, privilege in conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END, a.privilege_type "
            "FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = %s AND a.grantee <> c.relowner",
            (oid,),
        ).fetchall():
            out.add(
                f"grant:{grantee or 'PUBLIC'}",
                f"GRANT {privilege} ON {_q(*table)} TO {_q(grantee) if grantee else 'PUBLIC'}",
            )
    out.statements += keys.statements
    return out


def _types(conn: psycopg.Connection, oids: list[int | None], out: Definitions) -> None:
    """Enums and domains the columns use (a domain's base type first), skipping built-in types."""
    rows = conn.execute(
        "WITH RECURSIVE used(oid) AS (SELECT DISTINCT coalesce(nullif(t.typelem, 0), t.oid) FROM pg_attribute a "
        "JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped "
        "UNION SELECT coalesce(nullif(b.typelem, 0), b.oid) FROM used u JOIN pg_type d ON d.oid = u.oid "
        "JOIN pg_type b ON b.oid = d.typbasetype WHERE d.typtype = 'd') "
        "SELECT t.oid, n.nspname, t.typname, t.typtype, format_type(t.typbasetype, t.typtypmod), "
        "t.typnotnull, t.typdefault FROM used u JOIN pg_type t ON t.oid = u.oid "
        "JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND t.typtype IN ('e', 'd') ORDER BY t.oid",
        ([o for o in oids if o is not None],),
    ).fetchall()
    for oid, schema, name, typtype, base, notnull, default in rows:
        out.add(f"schema:{schema}", f"CREATE SCHEMA IF NOT EXISTS {_q(schema)}")
        if typtype == "e":
            found = conn.execute(
                "SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder", (oid,)
            ).fetchall()
            labels = [r[0] for r in found]
            values = ", ".join(sql.Literal(v).as_string(conn) for v in labels)
            out.add(f"type:{schema}.{name}", f"CREATE TYPE {_q(schema, name)} AS ENUM ({values})")
            continue
        text = f"CREATE DOMAIN {_q(schema, name)} AS {base}"
        if default is not None:
            text += f" DEFAULT {default}"
        if notnull:
            text += " NOT NULL"
        for conname, condef in conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = %s ORDER BY conname",
            (oid,),
        ).fetchall():
            text += f" CONSTRAINT {_q(conname)} {condef}"
        out.add(f"type:{schema}.{name}", text)


# The sequences a table's values come from: identity (deptype i), serial or OWNED BY (a), and any other
# sequence a column default calls nextval() on (a dependency of the default, pg_attrdef).
USED_SEQUENCES = (
    "SELECT s.oid, d.deptype = 'i' AS identity FROM pg_depend d JOIN pg_class s ON s.oid = d.objid "
    "WHERE d.refobjid = %(t)s AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') AND s.relkind = 'S' "
    "UNION SELECT s.oid, false FROM pg_attrdef ad JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass "
    "AND d.objid = ad.oid JOIN pg_class s ON s.oid = d.refobjid WHERE ad.adrelid = %(t)s "
    "AND d.refclassid = 'pg_class'::regclass AND s.relkind = 'S'"
)


def _sequences(conn: psycopg.Connection, oid: int | None, out: Definitions) -> None:
    """Sequences the table's defaults use (serial, OWNED BY, shared ones), created before the table; identity
    sequences come with their columns."""
    for schema, name, start, inc, minv, maxv, cache, cycle, typ in conn.execute(
        sql.SQL(
            "WITH used AS ({}) "
            "SELECT n.nspname, s.relname, q.seqstart, q.seqincrement, q.seqmin, q.seqmax, q.seqcache, q.seqcycle, "
            "format_type(q.seqtypid, NULL) FROM used u JOIN pg_class s ON s.oid = u.oid "
            "JOIN pg_namespace n ON n.oid = s.relnamespace JOIN pg_sequence q ON q.seqrelid = s.oid "
            "WHERE NOT u.identity ORDER BY 1, 2"
        ).format(sql.SQL(USED_SEQUENCES)),
        {"t": oid},
    ).fetchall():
        out.add(f"schema:{schema}", f"CREATE SCHEMA IF NOT EXISTS {_q(schema)}")
        out.add(
            f"sequence:{schema}.{name}",
            f"CREATE SEQUENCE IF NOT EXISTS {_q(schema, name)} AS {typ} INCREMENT {inc} MINVALUE {minv} "
            f"MAXVALUE {maxv} START {start} CACHE {cache}{' CYCLE' if cycle else ''}",
        )


def _table(conn: psycopg.Connection, table: Table, oid: int | None, out: Definitions) -> None:
    cols = []
    owned = []
    for name, typ, notnull, default, identity, generated, seq in conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid), "
        "a.attidentity, a.attgenerated, pg_get_serial_sequence(%s, a.attname) FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (label(table), oid),
    ).fetchall():
        text = f"{_q(name)} {typ}"
        if generated == "s":
            text += f" GENERATED ALWAYS AS ({default}) STORED"
        elif identity in ("a", "d"):
            text += f" GENERATED {'ALWAYS' if identity == 'a' else 'BY DEFAULT'} AS IDENTITY"
        elif default is not None:
            text += f" DEFAULT {default}"
            if seq:
                owned.append((seq, name))
        if notnull and identity not in ("a", "d"):
            text += " NOT NULL"
        cols.append(text)
    out.add(f"table:{table[0]}.{table[1]}", f"CREATE TABLE {_q(*table)} ({', '.join(cols)})")
    for seq, col in owned:
        out.add("owned", f"ALTER SEQUENCE {seq} OWNED BY {_q(*table, col)}")


def existing(conn: psycopg.Connection, what: str) -> bool:
    """Whether a type, sequence or table named by a Definitions entry exists on this server already."""
    kind, _, name = what.partition(":")
    if kind not in ("type", "sequence", "table"):
        return False
    schema, _, rel = name.partition(".")
    if kind == "type":
        query = (
            "SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname = %s AND t.typname = %s"
        )
    else:
        query = (
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s"
        )
    return conn.execute(query, (schema, rel)).fetchone() is not None


def create_tables(conn: psycopg.Connection, defs: Definitions) -> list[str]:
    """Run the definitions on the target in one transaction; returns the tables created. Tables that exist
    already (with the source's columns: checked before) are kept as they are, with their constraints."""
    created: list[str] = []
    skip_rest_of: str | None = None
    with conn.transaction():
        for what, statement in defs.statements:
            if what.startswith("table:"):
                skip_rest_of = what if existing(conn, what) else None
                if skip_rest_of is None:
                    created.append(what.partition(":")[2])
                    conn.execute(statement.encode())
                continue
            if skip_rest_of is not None and not what.startswith(("type:", "sequence:", "schema:")):
                continue
            if what.startswith("grant:") and what != "grant:PUBLIC":
                role = what.partition(":")[2]
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                    continue  # grants where the roles exist
            if existing(conn, what):
                continue
            conn.execute(statement.encode())
    return created


# --- guard trigger ----------------------------------------------------------------------------------------


def ensure_guard_function(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_schema(conn, state_schema)
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction', MESSAGE = format("
            "'%I.%I is read-only: DatabaseSplit %s moved its writes to the other database', "
            "TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]); END $$"
        ).format(qualified(state_schema, GUARD_FUNCTION))
    )


def guarded(conn: psycopg.Connection, table: Table) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgrelid = %s AND tgname = %s", (table_oid(conn, table), GUARD_TRIGGER)
    ).fetchone()
    return row is not None


def guard(conn: psycopg.Connection, state_schema: str, tables: list[Table], split: str) -> None:
    """Make the tables read-only for ordinary sessions (replication's apply workers still write)."""
    for table in tables:
        if table_oid(conn, table) is None or guarded(conn, table):
            continue
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {} "
                "FOR EACH STATEMENT EXECUTE FUNCTION {}({})"
            ).format(
                sql.Identifier(GUARD_TRIGGER),
                qualified(*table),
                qualified(state_schema, GUARD_FUNCTION),
                sql.Literal(split),
            )
        )


def unguard(conn: psycopg.Connection, tables: list[Table]) -> None:
    for table in tables:
        if table_oid(conn, table) is not None and guarded(conn, table):
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(GUARD_TRIGGER), qualified(*table))
            )


# --- publications, slots, subscriptions -----------------------------------------------------------------


def ensure_publication(conn: psycopg.Connection, name: str, tables: list[Table]) -> None:
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone() is not None:
        return
    conn.execute(
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(name), sql.SQL(", ").join(qualified(*t) for t in tables)
        )
    )


def drop_publication(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


def slot_exists(conn: psycopg.Connection, slot: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() is not None


def ensure_slot(conn: psycopg.Connection, slot: str) -> None:
    """A logical slot (pgoutput) made by pgscale, so CREATE SUBSCRIPTION needs no connection back to
    itself (which hangs when both databases are on one server)."""
    if not slot_exists(conn, slot):
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))


def drop_slots(conn: psycopg.Connection, slot: str, subscription_oid: int | None, *, wait: float = 5.0) -> list[str]:
    """Drop the subscription's slot and its table-sync slots (pg_<oid>_sync_...). A walsender still on one
    (its subscriber just went away) is ended first; a slot still in use after `wait` seconds raises
    SlotBusy, so the caller retries instead of leaving a slot that holds WAL forever."""
    pattern = f"pg\\_{subscription_oid}\\_sync\\_%" if subscription_oid else None
    rows = conn.execute(
        "SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name = %s OR slot_name LIKE %s",
        (slot, pattern or slot),
    ).fetchall()
    dropped = []
    for name, pid in rows:
        deadline = time.monotonic() + wait
        while pid is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if time.monotonic() > deadline:
                raise SlotBusy(name)
            time.sleep(0.1)
            row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
            pid = row[0] if row else None
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s "
            "AND active_pid IS NULL",
            (name,),
        )
        dropped.append(name)
    return dropped


class SlotBusy(TransientError):
    """A replication slot stayed in use after its subscriber went away; dropping it is retried."""

    def __init__(self, slot: str) -> None:
        super().__init__(
            f"replication slot {slot} is still in use after its subscription went away; dropped on the next try",
            reason="SlotBusy",
            retry_seconds=5,
        )


def subscription(conn: psycopg.Connection, name: str) -> tuple[int, bool] | None:
    """(oid, enabled) of a subscription of this database."""
    row = conn.execute(
        "SELECT s.oid, s.subenabled FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        "WHERE s.subname = %s AND d.datname = current_database()",
        (name,),
    ).fetchone()
    return (int(row[0]), bool(row[1])) if row else None


def create_subscription(
    conn: psycopg.Connection, *, name: str, conninfo: str, publication: str, copy_data: bool
) -> None:
    """A subscription on the slot of the same name (made before). The connection string holds a
    password: it goes into the statement as a literal and into no message."""
    if subscription(conn, name) is not None:
        return
    statement = sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (create_slot = false, slot_name = {}, "
        "copy_data = {}, enabled = true, synchronous_commit = on)"
    ).format(
        sql.Identifier(name),
        sql.Literal(conninfo),
        sql.Identifier(publication),
        sql.Literal(name),
        sql.Literal(copy_data),
    )
    conn.execute(statement)


def disable_subscription(conn: psycopg.Connection, name: str) -> None:
    found = subscription(conn, name)
    if found is not None and found[1]:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(name)))


def enable_subscription(conn: psycopg.Connection, name: str) -> None:
    found = subscription(conn, name)
    if found is not None and not found[1]:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))


def drop_subscription(conn: psycopg.Connection, name: str) -> int | None:
    """Drop a subscription without touching its slot (the caller drops slots on the publisher); its oid."""
    found = subscription(conn, name)
    if found is None:
        return None
    ident = sql.Identifier(name)
    if found[1]:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    return found[0]


def sync_states(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """schema.table -> init/copying/copied/syncing/ready, from pg_subscription_rel."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, r.srsubstate FROM pg_subscription_rel r JOIN pg_subscription s "
        "ON s.oid = r.srsubid JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE s.subname = %s",
        (name,),
    ).fetchall()
    return {f"{s}.{t}": READY_STATES.get(state, "unknown") for s, t, state in rows}


def slot_lag_bytes(conn: psycopg.Connection, slot: str) -> int | None:
    """WAL of the publisher the slot's subscriber has not confirmed yet."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def lag_seconds(conn: psycopg.Connection, name: str) -> float | None:
    """Seconds since the subscriber last heard from the publisher (on the subscriber)."""
    row = conn.execute(
        "SELECT extract(epoch FROM now() - max(last_msg_receipt_time))::float8 FROM pg_stat_subscription "
        "WHERE subname = %s",
        (name,),
    ).fetchone()
    return round(max(float(row[0]), 0.0), 1) if row and row[0] is not None else None


def current_lsn(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def flush_wal(conn: psycopg.Connection) -> None:
    """Make the server flush its WAL now (a walsender sends only flushed WAL; with synchronous_commit = off
    the WAL writer would do it within wal_writer_delay): a committed logical message, committed synchronously."""
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'pgscale.split', 'flush')")


def confirmed(conn: psycopg.Connection, slot: str, lsn: str) -> bool:
    """Whether the slot's subscriber confirmed everything up to lsn."""
    row = conn.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (lsn, slot)
    ).fetchone()
    return bool(row and row[0])


def table_bytes(conn: psycopg.Connection, tables: list[Table]) -> int:
    total = 0
    for table in tables:
        oid = table_oid(conn, table)
        if oid is not None:
            row = conn.execute("SELECT pg_table_size(%s)", (oid,)).fetchone()
            total += int(row[0]) if row else 0
    return total


def estimated_rows(conn: psycopg.Connection, table: Table) -> int | None:
    row = conn.execute(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s", (table_oid(conn, table),)
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


# --- cutover helpers ------------------------------------------------------------------------------------


def lock_tables(conn: psycopg.Connection, tables: list[Table], lock_timeout_ms: int) -> None:
    """Inside the caller's transaction: block writes (reads go on) under lock_timeout."""
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
    conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(qualified(*t) for t in tables)))
    conn.execute("SELECT set_config('lock_timeout', '0', true)")


def sequences(conn: psycopg.Connection, tables: list[Table]) -> dict[Table, int]:
    """The sequences the tables' values come from (USED_SEQUENCES), by (schema, name): the next value they give."""
    out: dict[Table, int] = {}
    for table in tables:
        for schema, name in conn.execute(
            sql.SQL(
                "WITH used AS ({}) SELECT DISTINCT n.nspname, s.relname FROM used u "
                "JOIN pg_class s ON s.oid = u.oid JOIN pg_namespace n ON n.oid = s.relnamespace ORDER BY 1, 2"
            ).format(sql.SQL(USED_SEQUENCES)),
            {"t": table_oid(conn, table)},
        ).fetchall():
            row = conn.execute(
                sql.SQL("SELECT last_value, is_called FROM {}").format(qualified(schema, name))
            ).fetchone()
            assert row is not None
            out[(schema, name)] = int(row[0]) + (1 if row[1] else 0)
    return out


def set_sequences(conn: psycopg.Connection, values: dict[Table, int], gap: int = SEQUENCE_GAP) -> None:
    """Each sequence past the other side's next value plus a gap (never moved backwards)."""
    for seq, value in values.items():
        name = qualified(*seq)
        if conn.execute("SELECT to_regclass(%s)", (name.as_string(conn),)).fetchone() == (None,):
            continue
        conn.execute(
            sql.SQL("SELECT setval(%s::regclass, greatest(%s, (SELECT last_value FROM {})), true)").format(name),
            (name.as_string(conn), value + gap),
        )


def fingerprint(conn: psycopg.Connection, table: Table, cols: list[str]) -> tuple[int, int]:
    """Row count and an order-independent checksum (the sum of each row's 64-bit hash) of a table.

    hashtextextended is the hash of hash partitioning, which must not change between versions, so two
    servers of different majors agree; it is several times cheaper than md5 per row."""
    row_text = sql.SQL("ROW({})::text").format(
        sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in cols)
    )
    row = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(hashtextextended({}, 0)::numeric), 0) FROM {} t").format(
            row_text, qualified(*table)
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def replicated_columns(conn: psycopg.Connection, table: Table) -> list[str]:
    """The columns logical replication carries (generated columns are computed on each side)."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = '' ORDER BY attnum",
        (table_oid(conn, table),),
    ).fetchall()
    return [r[0] for r in rows]


def drop_tables(conn: psycopg.Connection, tables: list[Table]) -> None:
    """One statement: foreign keys among the tables do not block it, any from elsewhere do (no CASCADE)."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.SQL(", ").join(qualified(*t) for t in tables)))
