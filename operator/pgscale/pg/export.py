"""SQL of RetentionPolicy's action export: the batch's locked rows, their deletion, and the ledger.

A batch is recorded as *pending* (its own committed transaction) before any file of it is
written; then, in one transaction, its rows are locked and read, their files are written
and read back by the caller, the rows are deleted (children first) and the batch is marked
*done* with its files. So the ledger says, for every object under a batch's keys, whether
it holds the only copy of its rows (done) or a copy of rows still in the table (pending:
never counted, rewritten or removed by the next run).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import ensure_state_table, lock_state_ddl, qualified, table_columns
from .relationships import fingerprint_query
from .retention import (
    ChildPlan,
    Target,
    _Aliases,
    _blockers,
    _cols,
    _page_range,
    predicate,
    primary_key,
    runs_table,
)

if TYPE_CHECKING:  # pgscale.parquet loads pyarrow (~50 MB): the operator imports this module, rarely exports
    from ..parquet import Mapped


@dataclass(frozen=True)
class PgColumn:
    """A column as the catalog describes it (pg.export.columns reads it)."""

    name: str
    type: str  # format_type(), e.g. numeric(12,2), "Status"[]
    typname: str  # pg_type.typname of the column's type (of the element, for an array)
    typtype: str = "b"  # of that type: b base, e enum, d domain, c composite, r range, ...
    typmod: int = -1
    array: bool = False
    generated: bool = False  # GENERATED ALWAYS AS (...) STORED: exported, never inserted on restore


BATCHES = "export_batches"
FILES = "export_files"
log = logging.getLogger(__name__)

TALLIES = "export_tallies"  # what done batches add to their run's log row, until folded into it


def columns(conn: psycopg.Connection, schema: str, table: str) -> list[PgColumn]:
    """A table's columns with what the type mapping needs (types resolved by oid, never by spec text)."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), coalesce(e.typname, t.typname), "
        "coalesce(e.typtype, t.typtype), a.atttypmod, e.oid IS NOT NULL, a.attgenerated <> '' "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' "
        "WHERE a.attrelid = (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return [PgColumn(r[0], r[1], r[2], r[3], int(r[4]), bool(r[5]), bool(r[6])) for r in rows]


def _expr(alias: str, m: Mapped) -> sql.Composable:
    col = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(m.name))
    if not m.as_text:
        return col
    return sql.SQL("{}::text[]" if m.column.array else "{}::text").format(col)


# --- the ledger --------------------------------------------------------------------------


def batches_table(state_schema: str) -> sql.Composed:
    return qualified(state_schema, BATCHES)


def files_table(state_schema: str) -> sql.Composed:
    return qualified(state_schema, FILES)


def ensure_ledger(conn: psycopg.Connection, state_schema: str) -> None:
    """pgscale's ledger of exported files: batches (pending, then done) and the files of done ones."""
    ensure_state_table(
        conn,
        state_schema,
        BATCHES,
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, policy text NOT NULL, "
        "status text NOT NULL DEFAULT 'pending', stem text NOT NULL, grp text NOT NULL, "
        "cutoff timestamptz, lo bigint, hi bigint, partition_schema text, partition_name text, "
        "tables jsonb NOT NULL DEFAULT '[]', run_id bigint, created_at timestamptz NOT NULL DEFAULT now(), "
        "done_at timestamptz",
    )
    ensure_state_table(
        conn,
        state_schema,
        FILES,
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, batch_id bigint NOT NULL, policy text NOT NULL, "
        "source_schema text NOT NULL, source_table text NOT NULL, root boolean NOT NULL, "
        "object_key text NOT NULL, manifest_key text NOT NULL, location text NOT NULL, destination jsonb NOT NULL, "
        "rows bigint NOT NULL, bytes bigint NOT NULL, sha256 text NOT NULL, fingerprint text NOT NULL, "
        "row_bytes bigint NOT NULL DEFAULT 0, key_columns jsonb, key_min jsonb, key_max jsonb, "
        "age_column text, age_min timestamptz, age_max timestamptz, cutoff timestamptz, "
        "partition_name text, created_at timestamptz NOT NULL DEFAULT now(), restored_at timestamptz, "
        "restored_into text",
    )
    ensure_state_table(
        conn,
        state_schema,
        TALLIES,
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, run_id bigint NOT NULL, rows bigint NOT NULL, "
        "counts jsonb NOT NULL",
    )
    with conn.transaction():
        lock_state_ddl(conn)
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (policy, status)").format(
                sql.Identifier(f"{BATCHES}_policy_idx"), batches_table(state_schema)
            )
        )
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (policy, batch_id)").format(
                sql.Identifier(f"{FILES}_policy_idx"), files_table(state_schema)
            )
        )


@dataclass(frozen=True)
class PendingBatch:
    """A batch recorded before its files were written; not done yet (or never: killed)."""

    id: int
    stem: str
    group: str
    cutoff: datetime | None
    lo: int | None
    hi: int | None
    tables: list[tuple[str, str]]
    partition: tuple[str, str] | None = None


def begin_batch(
    conn: psycopg.Connection,
    state_schema: str,
    *,
    policy: str,
    group: str,
    tables: list[tuple[str, str]],
    run_id: int | None,
    cutoff: datetime | None = None,
    lo: int | None = None,
    hi: int | None = None,
    partition: tuple[str, str] | None = None,
) -> PendingBatch:
    """Record a batch as pending, committed before any of its files is written. Its stem (the files'
    name) carries the batch id and a random token: no other batch, run or database writes its keys."""
    token = secrets.token_hex(4)
    with conn.transaction():
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {} (policy, stem, grp, cutoff, lo, hi, tables, run_id, partition_schema, partition_name) "
                "VALUES (%s, '', %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"
            ).format(batches_table(state_schema)),
            (
                policy,
                group,
                cutoff,
                lo,
                hi,
                Jsonb([list(t) for t in tables]),
                run_id,
                partition[0] if partition else None,
                partition[1] if partition else None,
            ),
        ).fetchone()
        assert row is not None
        stem = f"part-{int(row[0]):08d}-{token}"
        conn.execute(
            sql.SQL("UPDATE {} SET stem = %s WHERE id = %s").format(batches_table(state_schema)), (stem, row[0])
        )
    return PendingBatch(int(row[0]), stem, group, cutoff, lo, hi, tables, partition)


def pending_batches(conn: psycopg.Connection, state_schema: str, policy: str) -> list[PendingBatch]:
    """Batches of a policy that a killed or failed run left pending, oldest first."""
    rows = conn.execute(
        sql.SQL(
            "SELECT id, stem, grp, cutoff, lo, hi, tables, partition_schema, partition_name FROM {} "
            "WHERE policy = %s AND status = 'pending' ORDER BY id"
        ).format(batches_table(state_schema)),
        (policy,),
    ).fetchall()
    return [
        PendingBatch(
            int(r[0]),
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            [(t[0], t[1]) for t in r[6] or []],
            (r[7], r[8]) if r[8] is not None else None,
        )
        for r in rows
    ]


def forget_batch(conn: psycopg.Connection, state_schema: str, batch_id: int) -> None:
    """Drop a pending batch whose files are gone (or never were): it holds no rows."""
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE id = %s AND status = 'pending'").format(batches_table(state_schema)),
        (batch_id,),
    )


@dataclass
class FileRecord:
    """One verified file of a batch, as the ledger keeps it."""

    source_schema: str
    source_table: str
    root: bool
    object_key: str
    manifest_key: str
    location: str
    destination: dict[str, Any]
    rows: int
    bytes: int
    sha256: str
    fingerprint: str
    row_bytes: int
    key_columns: list[str] = field(default_factory=list)
    key_min: list[Any] | None = None
    key_max: list[Any] | None = None
    age_column: str | None = None
    age_min: datetime | None = None
    age_max: datetime | None = None
    cutoff: datetime | None = None
    partition_name: str | None = None


def finish_batch(
    conn: psycopg.Connection,
    state_schema: str,
    *,
    batch_id: int,
    policy: str,
    files: list[FileRecord],
    run_id: int | None,
    counts: dict[str, int],
) -> None:
    """In the batch's own transaction, after its rows are deleted: the batch is done, its files are
    recorded, and the run log counts it (rows exported as archived)."""
    cur = conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'done', done_at = clock_timestamp() WHERE id = %s AND status = 'pending'"
        ).format(batches_table(state_schema)),
        (batch_id,),
    )
    if cur.rowcount != 1:
        raise RuntimeError(f"export batch {batch_id} is no longer pending; its rows stay in the table")
    names = RECORDED_COLUMNS
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        files_table(state_schema),
        sql.SQL(", ").join(sql.Identifier(n) for n in names),
        sql.SQL(", ").join(sql.Placeholder() for _ in names),
    )
    for f in files:
        conn.execute(
            statement,
            (
                batch_id,
                policy,
                f.source_schema,
                f.source_table,
                f.root,
                f.object_key,
                f.manifest_key,
                f.location,
                Jsonb(f.destination),
                f.rows,
                f.bytes,
                f.sha256,
                f.fingerprint,
                f.row_bytes,
                Jsonb(f.key_columns),
                Jsonb(f.key_min),
                Jsonb(f.key_max),
                f.age_column,
                f.age_min,
                f.age_max,
                f.cutoff,
                f.partition_name,
            ),
        )
    if run_id is None:
        return
    # A row of its own, not the run's log row: batches that overlap (two sessions, REPEATABLE READ)
    # would otherwise both update that row, and the later one fail to serialize. fold_tallies adds it.
    conn.execute(
        sql.SQL("INSERT INTO {} (run_id, rows, counts) VALUES (%s, %s, %s)").format(qualified(state_schema, TALLIES)),
        (run_id, sum(f.rows for f in files if f.root), Jsonb(counts)),
    )


def fold_tallies(conn: psycopg.Connection, state_schema: str) -> None:
    """Add done batches' tallies to their runs' log rows (rows exported as archived), each exactly once:
    after every commit, and at a run's start and end (a killed run's last batch)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")  # the session may default to REPEATABLE READ
        tallies = conn.execute(
            sql.SQL("DELETE FROM {} RETURNING run_id, rows, counts").format(qualified(state_schema, TALLIES))
        ).fetchall()
        for run_id, exported, counts in tallies:
            conn.execute(
                sql.SQL(
                    "UPDATE {runs} SET rows_archived = rows_archived + %(n)s, batches = batches + 1, "
                    "updated_at = clock_timestamp(), tables = (SELECT jsonb_object_agg(k, v) FROM (SELECT k, "
                    "sum(v)::bigint AS v FROM (SELECT key, value::bigint FROM jsonb_each_text(coalesce({runs}.tables, "
                    "'{{}}'::jsonb)) UNION ALL SELECT key, value::bigint FROM jsonb_each_text(%(counts)s::jsonb)) "
                    "y(k, v) WHERE v > 0 GROUP BY k) z) WHERE id = %(run)s"
                ).format(runs=runs_table(state_schema)),
                {"n": exported, "counts": Jsonb(counts), "run": run_id},
            )


def fold_after_commit(conn: psycopg.Connection, state_schema: str) -> None:
    """fold_tallies after a batch's commit: its failure (a lock or statement timeout) is the run log's
    alone and must never reach the batch's retry (it would take the committed batch again, rewriting
    or clearing the files that hold its rows); the tally stays and the next fold adds it."""
    try:
        fold_tallies(conn, state_schema)
    except psycopg.Error as exc:
        log.warning("run log not updated yet (%s); a later fold adds the batch", type(exc).__name__)


# --- the rows of a batch -----------------------------------------------------------------


@dataclass
class Locked:
    """Rows of one table that a batch holds: their identity, then (deleted) their values and size."""

    idents: list[tuple[int, str]] = field(default_factory=list)  # (tableoid, ctid)
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    row_bytes: int = 0
    last: str | None = None  # the highest ctid locked (of the root, on a plain table: where the next batch starts)
    _params: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def add(self, found: list[tuple[Any, ...]]) -> list[tuple[int, str]]:
        """Add identities (rows of (tableoid, ctid)); returns them (a row reached by two keys is kept once)."""
        seen = set(self.idents)
        out = [(int(r[0]), str(r[1])) for r in found]
        self.idents += [i for i in dict.fromkeys(out) if i not in seen]
        self._params = None
        return out

    def params(self) -> dict[str, Any]:
        """The identities as statement parameters, built once (the lookups of children and the DELETE
        each send them)."""
        if self._params is None:
            self._params = _ident_params(self.idents)
        return self._params


def _ident_list(alias: str) -> sql.Composable:
    a = sql.Identifier(alias)
    return sql.SQL("{}.tableoid::bigint, {}.ctid::text").format(a, a)


def _order(conn: psycopg.Connection, schema: str, table: str, mapped: list[Mapped]) -> sql.Composable:
    """Output positions of the primary key's columns (files are sorted by key, their key range first and
    last), else of the row's position."""
    names = [m.name for m in mapped]
    keys = primary_key(conn, schema, table)
    if not keys or any(k not in names for k in keys):
        return sql.SQL("1, 2")
    return sql.SQL(", ").join(sql.Literal(4 + names.index(k)) for k in keys)


def _batch_where(target: Target) -> tuple[sql.Composable, list[tuple[str, sql.Composable]]]:
    where, _ = predicate(target)
    where = sql.SQL("{} AND {}").format(_page_range("s", False), where)
    if target.fingerprint:  # as in the archive batches: keys changed since planning -> nothing taken
        where = sql.SQL("{} AND ({}) = {}").format(
            where, fingerprint_query(target.tables), sql.Literal(target.fingerprint)
        )
    return where, _blockers("s", target.scan, target.children, _Aliases())


def lock_root(conn: psycopg.Connection, target: Target, params: dict[str, Any], *, limit: int) -> Locked:
    """The matching rows of the batch's pages that may go (parents kept for their children are not
    taken), locked (``SKIP LOCKED``: rows others hold wait for the next run); at most ``limit``, the
    first in the pages (a file never holds more than rowsPerFile rows of the table)."""
    where, blockers = _batch_where(target)
    if blockers:
        where = sql.SQL("{} AND NOT ({})").format(where, sql.SQL(" OR ").join(b for _, b in blockers))
    # The identities come back as two texts (the form the later statements take them in), not as
    # one row each: building and re-joining 100,000 rows in Python costs more than locking them.
    query = sql.SQL(
        "SELECT count(*), string_agg(l.o::text, ','), string_agg(l.t::text, ';'), max(l.t)::text "
        "FROM (SELECT s.tableoid AS o, s.ctid AS t FROM {} s WHERE {} ORDER BY s.tableoid, s.ctid LIMIT {} "
        "FOR UPDATE OF s SKIP LOCKED) l"
    ).format(target.scan, where, sql.Literal(limit))
    row = conn.execute(query, params).fetchone()
    if row is None or not row[0]:
        return Locked()
    oids, tids = str(row[1]), str(row[2])
    out = Locked(idents=list(zip(map(int, oids.split(",")), tids.split(";"), strict=True)))
    out._params = {"oids": oids, "tids": tids}
    out.last = str(row[3])
    return out


def count_kept(conn: psycopg.Connection, target: Target, params: dict[str, Any]) -> dict[str, int]:
    """Matching rows of the batch's pages kept for their children, per constraint (for the run log)."""
    where, blockers = _batch_where(target)
    if not blockers:
        return {}
    counts = sql.SQL(", ").join(sql.SQL("count(*) FILTER (WHERE {})").format(b) for _, b in blockers)
    row = conn.execute(sql.SQL("SELECT {} FROM {} s WHERE {}").format(counts, target.scan, where), params).fetchone()
    out: dict[str, int] = {}
    for (label, _), n in zip(blockers, row or (), strict=False):
        out[label] = out.get(label, 0) + int(n)
    return out


# Row identities travel as one text each, split by the server: adapting a list of 100,000 tids
# in Python costs more than the batch's DELETE.
_OIDS = sql.SQL("string_to_array(%(oids)s, ',')::oid[]")
_TIDS = sql.SQL("string_to_array(%(tids)s, ';')::tid[]")


def _tid_bounds(alias: str) -> sql.Composable:
    """The identities' lowest and highest tid as a range the scan reads (a TID range scan), so that
    finding a batch's rows reads their pages, not the whole table (which the planner, costing one
    random read per tid, would otherwise prefer); on a partitioned table, of each partition."""
    a = sql.Identifier(alias)
    return sql.SQL(
        "{a}.ctid >= (SELECT min(x) FROM unnest({tids}) x) AND {a}.ctid <= (SELECT max(x) FROM unnest({tids}) x)"
    ).format(a=a, tids=_TIDS)


def _identified(alias: str, partitioned: bool) -> sql.Composable:
    """The rows of ``alias`` that the identities name."""
    a = sql.Identifier(alias)
    if partitioned:
        found = sql.SQL("({a}.tableoid, {a}.ctid) IN (SELECT * FROM unnest({oids}, {tids}))").format(
            a=a, oids=_OIDS, tids=_TIDS
        )
    else:
        found = sql.SQL("{a}.ctid = ANY ({tids})").format(a=a, tids=_TIDS)
    return sql.SQL("{} AND {}").format(found, _tid_bounds(alias))


def _parents(parent_scan: sql.Composable, parent_partitioned: bool) -> sql.Composable:
    return sql.SQL("{} p WHERE {}").format(parent_scan, _identified("p", parent_partitioned))


def _ident_params(idents: list[tuple[int, str]]) -> dict[str, Any]:
    return {"oids": ",".join(str(i[0]) for i in idents), "tids": ";".join(i[1] for i in idents)}


def lock_children(
    conn: psycopg.Connection,
    plan: ChildPlan,
    parent_scan: sql.Composable,
    parent_partitioned: bool,
    parents: Locked,
    into: Locked,
) -> list[tuple[int, str]]:
    """Rows of a referencing table whose key points at the batch's (locked) parent rows, locked too and
    added to ``into``. Returns the identities found through this key."""
    fk = plan.fk
    cols = sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in fk.columns)
    refs = sql.SQL(", ").join(sql.SQL("p.{}").format(sql.Identifier(c)) for c in fk.ref_columns)
    query = sql.SQL("SELECT {} FROM {} c WHERE ({}) IN (SELECT {} FROM {}) FOR UPDATE OF c").format(
        _ident_list("c"), plan.scan, cols, refs, _parents(parent_scan, parent_partitioned)
    )
    return into.add(conn.execute(query, parents.params()).fetchall())


def lock_descendants(
    conn: psycopg.Connection,
    edges: list[ChildPlan],
    scan: sql.Composable,
    partitioned: bool,
    rows: Locked,
) -> list[tuple[int, str]]:
    """Through a table's references to itself (``edges``, each archiving or deleting): the rows below
    the batch's rows of that table, at any depth, locked (``FOR UPDATE``) and added to ``rows``; they go
    with them, into the same file. Returns the identities added (a cycle in the data ends the walk)."""
    refs = sorted({c for e in edges for c in e.fk.ref_columns})
    ident = sql.SQL("p.tableoid, p.ctid") if partitioned else sql.SQL("p.ctid")
    seed = sql.SQL("SELECT {}, {} FROM {} p WHERE {}").format(
        ident, _cols("p", refs), scan, _identified("p", partitioned)
    )
    step_ident = sql.SQL("t.tableoid, t.ctid") if partitioned else sql.SQL("t.ctid")
    join = sql.SQL(" OR ").join(
        sql.SQL("({}) = ({})").format(_cols("t", list(e.fk.columns)), _cols("d", list(e.fk.ref_columns))) for e in edges
    )
    names = sql.SQL("tableoid, ctid") if partitioned else sql.SQL("ctid")
    cols = sql.SQL(", ").join([names, *(sql.Identifier(c) for c in refs)])
    found = (
        sql.SQL("(t.tableoid, t.ctid) IN (SELECT tableoid, ctid FROM d)")
        if partitioned
        else sql.SQL("t.ctid = ANY (ARRAY(SELECT ctid FROM d))")
    )
    query = sql.SQL(
        "WITH RECURSIVE d({cols}) AS ({seed} UNION SELECT {step_ident}, {step_refs} FROM {scan} t JOIN d ON {join}) "
        "SELECT {out} FROM {scan} t WHERE {found} FOR UPDATE OF t"
    ).format(
        cols=cols,
        seed=seed,
        step_ident=step_ident,
        step_refs=_cols("t", refs),
        scan=scan,
        join=join,
        out=_ident_list("t"),
        found=found,
    )
    before = set(rows.idents)
    rows.add(conn.execute(query, rows.params()).fetchall())
    return [i for i in rows.idents if i not in before]


def count_children(
    conn: psycopg.Connection, plan: ChildPlan, parent_scan: sql.Composable, parent_partitioned: bool, parents: Locked
) -> int:
    """Rows whose key the database's own ON DELETE action (SET NULL / SET DEFAULT) will change."""
    fk = plan.fk
    cols = sql.SQL(", ").join(sql.SQL("c.{}").format(sql.Identifier(c)) for c in fk.columns)
    refs = sql.SQL(", ").join(sql.SQL("p.{}").format(sql.Identifier(c)) for c in fk.ref_columns)
    query = sql.SQL("SELECT count(*) FROM {} c WHERE ({}) IN (SELECT {} FROM {})").format(
        plan.scan, cols, refs, _parents(parent_scan, parent_partitioned)
    )
    row = conn.execute(query, parents.params()).fetchone()
    return int(row[0]) if row else 0


def delete_rows(
    conn: psycopg.Connection,
    scan: sql.Composable,
    partitioned: bool,
    rows: Locked,
    *,
    mapped: list[Mapped] | None = None,
    name: tuple[str, str] | None = None,
) -> int:
    """Delete exactly these (locked) rows; with ``mapped``, keep the versions deleted in ``rows``
    (values sorted by primary key, and their size), which the batch writes before it commits."""
    if not rows.idents:
        return 0
    where = _identified("t", partitioned)
    if mapped is None:
        return conn.execute(sql.SQL("DELETE FROM {} t WHERE {}").format(scan, where), rows.params()).rowcount
    assert name is not None
    returning = sql.SQL(", ").join([_ident_list("t"), sql.SQL("pg_column_size(t.*)"), *(_expr("t", m) for m in mapped)])
    query = sql.SQL("WITH d AS (DELETE FROM {} t WHERE {} RETURNING {}) SELECT * FROM d ORDER BY {}").format(
        scan, where, returning, _order(conn, *name, mapped)
    )
    found = conn.execute(query, rows.params()).fetchall()
    rows.rows = [tuple(r[3:]) for r in found]
    rows.row_bytes = sum(int(r[2] or 0) for r in found)
    return len(found)


# --- what was exported --------------------------------------------------------------------


@dataclass
class Totals:
    """Over the done files of a policy (status.export)."""

    files: int = 0
    rows: int = 0
    bytes: int = 0
    row_bytes: int = 0
    oldest: datetime | None = None
    newest: datetime | None = None
    restored: int = 0
    location: str | None = None


def totals(conn: psycopg.Connection, state_schema: str, policy: str) -> Totals:
    if table_columns(conn, state_schema, FILES) is None:
        return Totals()
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(rows), 0), coalesce(sum(bytes), 0), coalesce(sum(row_bytes), 0), "
            "min(age_min), max(age_max), count(restored_at), (array_agg(location ORDER BY id DESC))[1] "
            "FROM {} WHERE policy = %s"
        ).format(files_table(state_schema)),
        (policy,),
    ).fetchone()
    assert row is not None
    return Totals(int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4], row[5], int(row[6]), row[7])


# What a batch records for each file it wrote; the table adds id, created_at and the restore columns.
RECORDED_COLUMNS = (
    "batch_id",
    "policy",
    "source_schema",
    "source_table",
    "root",
    "object_key",
    "manifest_key",
    "location",
    "destination",
    "rows",
    "bytes",
    "sha256",
    "fingerprint",
    "row_bytes",
    "key_columns",
    "key_min",
    "key_max",
    "age_column",
    "age_min",
    "age_max",
    "cutoff",
    "partition_name",
)
FILE_COLUMNS = ("id", *RECORDED_COLUMNS, "created_at", "restored_at", "restored_into")


def list_files(
    conn: psycopg.Connection,
    state_schema: str,
    *,
    policy: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    partition: str | None = None,
) -> list[dict[str, Any]]:
    """Files of done batches, by batch and with the policy's table first: a batch whose root file's
    ageColumn range meets [since, until) is taken whole (its children's files with it)."""
    if table_columns(conn, state_schema, FILES) is None:
        return []
    conditions: list[sql.Composable] = [sql.SQL("true")]
    params: dict[str, Any] = {}
    if policy is not None:
        conditions.append(sql.SQL("f.policy = %(policy)s"))
        params["policy"] = policy
    picked: list[sql.Composable] = []
    if since is not None:
        picked.append(sql.SQL("r.age_max >= %(since)s"))
        params["since"] = since
    if until is not None:
        picked.append(sql.SQL("r.age_min < %(until)s"))
        params["until"] = until
    if partition is not None:
        picked.append(sql.SQL("r.partition_name = %(partition)s"))
        params["partition"] = partition
    if picked:
        conditions.append(
            sql.SQL("f.batch_id IN (SELECT r.batch_id FROM {} r WHERE r.root AND {})").format(
                files_table(state_schema), sql.SQL(" AND ").join(picked)
            )
        )
    query = sql.SQL("SELECT {} FROM {} f WHERE {} ORDER BY f.batch_id, NOT f.root, f.id").format(
        sql.SQL(", ").join(sql.SQL("f.") + sql.Identifier(c) for c in FILE_COLUMNS),
        files_table(state_schema),
        sql.SQL(" AND ").join(conditions),
    )
    return [dict(zip(FILE_COLUMNS, r, strict=True)) for r in conn.execute(query, params).fetchall()]


def mark_restored(conn: psycopg.Connection, state_schema: str, file_id: int, into: str) -> None:
    conn.execute(
        sql.SQL("UPDATE {} SET restored_at = clock_timestamp(), restored_into = %s WHERE id = %s").format(
            files_table(state_schema)
        ),
        (into, file_id),
    )
