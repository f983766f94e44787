"""Foreign keys that reference a table, found in the catalog, recursively.

Why: deleting a row sets off its references' ON DELETE actions. A retention run that
removes parent rows must know every such reference (children of children, partitioned
children, self-references) before it touches a row, or a cascade deletes or a SET NULL
changes rows that were archived nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
DESTRUCTIVE = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})
MAX_EDGES = 100


@dataclass(frozen=True)
class ForeignKey:
    """One foreign key: rows of (schema, table) point at rows of (ref_schema, ref_table)."""

    name: str
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_schema: str
    ref_table: str
    ref_columns: tuple[str, ...]
    action: str  # ON DELETE: NO ACTION, RESTRICT, CASCADE, SET NULL, SET DEFAULT

    @property
    def child(self) -> tuple[str, str]:
        return (self.schema, self.table)

    @property
    def parent(self) -> tuple[str, str]:
        return (self.ref_schema, self.ref_table)

    @property
    def self_reference(self) -> bool:
        return self.child == self.parent

    def describe(self) -> str:
        """For messages: constraint, tables and action (names only, never data)."""
        cols = ", ".join(self.columns)
        return f'"{self.name}" on "{self.schema}"."{self.table}" ({cols}) ON DELETE {self.action}'


_REFERENCES = """
WITH me AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = %s AND c.relname = %s),
tree AS (SELECT oid AS relid FROM me
         UNION SELECT relid FROM pg_partition_tree((SELECT oid FROM me)::regclass)
         UNION SELECT relid FROM pg_partition_ancestors((SELECT oid FROM me)::regclass))
SELECT c.conname, cn.nspname, cc.relname,
       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o),
       c.confdeltype
FROM pg_constraint c
JOIN pg_class cc ON cc.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND c.confrelid IN (SELECT relid FROM tree)
ORDER BY cn.nspname, cc.relname, c.conname
"""


def references(conn: psycopg.Connection, schema: str, table: str) -> list[ForeignKey]:
    """Foreign keys that point at rows of one table: at the table itself, at one of its partitions
    (a key may name a partition), or at a table it is a partition of (a key on the parent covers
    the partition's rows). Keys as declared, not the copies PostgreSQL makes per partition; each
    is reported as referencing ``(schema, table)``, whose rows it reaches."""
    rows = conn.execute(_REFERENCES, (schema, table)).fetchall()
    return [
        ForeignKey(r[0], r[1], r[2], tuple(r[3]), schema, table, tuple(r[4]), ACTIONS.get(r[5], "NO ACTION"))
        for r in rows
    ]


def fingerprint_query(tables: list[tuple[str, str]]) -> sql.Composed:
    """A query whose answer changes when any foreign key into these tables (their partitions and
    parents included) is added, dropped or re-created: a plan made before is then stale."""
    trees = sql.SQL(" UNION ").join(
        sql.SQL(
            "SELECT {t}::regclass UNION SELECT relid FROM pg_partition_tree({t}::regclass) "
            "UNION SELECT relid FROM pg_partition_ancestors({t}::regclass)"
        ).format(t=sql.Literal(sql.Identifier(schema, table).as_string(None)))
        for schema, table in tables
    )
    return sql.SQL(
        "SELECT coalesce(md5(string_agg(c.oid::text || c.confdeltype::text || c.conrelid::text, ',' "
        "ORDER BY c.oid)), '') FROM pg_constraint c WHERE c.contype = 'f' AND c.conparentid = 0 AND c.confrelid IN ({})"
    ).format(trees)


def fingerprint(conn: psycopg.Connection, tables: list[tuple[str, str]]) -> str:
    row = conn.execute(fingerprint_query(tables)).fetchone()
    return str(row[0]) if row else ""


def row_security_hides(conn: psycopg.Connection, tables: list[tuple[str, str]]) -> list[str]:
    """Tables whose row-level security hides rows from this session's role.

    pgscale's own steps would see only some rows, while ON DELETE actions (which bypass row
    security) act on all of them: such a run could delete rows it never saw.
    """
    out = []
    for schema, table in tables:
        row = conn.execute(
            "SELECT c.relrowsecurity AND NOT r.rolbypassrls AND NOT r.rolsuper "
            "AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE')) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_roles r "
            "WHERE n.nspname = %s AND c.relname = %s AND r.rolname = current_user",
            (schema, table),
        ).fetchone()
        if row and row[0]:
            out.append(f'"{schema}"."{table}"')
    return out


def reachable(conn: psycopg.Connection, schema: str, table: str) -> list[ForeignKey]:
    """Every foreign key into the table, and into the tables that reference it, recursively.

    Breadth-first, each table visited once; at most MAX_EDGES keys (a schema with more is
    reported as too large to plan, not walked forever).
    """
    seen = {(schema, table)}
    queue = [(schema, table)]
    out: list[ForeignKey] = []
    while queue and len(out) <= MAX_EDGES:
        current = queue.pop(0)
        for fk in references(conn, *current):
            out.append(fk)
            if fk.child not in seen:
                seen.add(fk.child)
                queue.append(fk.child)
    return out
