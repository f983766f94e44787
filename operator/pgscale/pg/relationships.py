"""Foreign keys that reference a table, found in the catalog, recursively.

Why: deleting a row sets off its references' ON DELETE actions. A retention run that
removes parent rows must know every such reference (children of children, partitioned
children, self-references) before it touches a row, or a cascade deletes or a SET NULL
changes rows that were archived nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

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
SELECT c.conname, cn.nspname, cc.relname,
       ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
       pn.nspname, pc.relname,
       ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o),
       c.confdeltype
FROM pg_constraint c
JOIN pg_class cc ON cc.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_class pc ON pc.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE c.contype = 'f' AND c.conparentid = 0 AND pn.nspname = %s AND pc.relname = %s
ORDER BY cn.nspname, cc.relname, c.conname
"""


def references(conn: psycopg.Connection, schema: str, table: str) -> list[ForeignKey]:
    """Foreign keys pointing at one table (a partitioned table's own, not its partitions' clones)."""
    rows = conn.execute(_REFERENCES, (schema, table)).fetchall()
    return [
        ForeignKey(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], tuple(r[6]), ACTIONS.get(r[7], "NO ACTION")) for r in rows
    ]


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
