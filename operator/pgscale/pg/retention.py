"""SQL of RetentionPolicy: the batch move, the archive table and the run log.

Why one statement per batch: ``INSERT INTO archive SELECT ...`` followed by a
separate ``DELETE`` reads two snapshots under READ COMMITTED, so a row changed
in between is deleted without being archived, or archived stale. Here each batch
is a single statement over a range of heap pages, ``WITH moved AS (DELETE ...
WHERE <pages> AND <predicate> RETURNING *) INSERT INTO archive SELECT ... FROM
moved``: the DELETE locks each row and re-checks the predicate against its latest
committed version, and exactly the versions it deleted are archived; the run log
row is updated in the same statement, so a crash loses nothing and repeats
nothing. A batch that meets a row another transaction holds locked runs again as
``SELECT ... FOR UPDATE SKIP LOCKED`` then DELETE, which passes such rows over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypedDict, cast

import psycopg
from psycopg import sql

from . import Column, ensure_schema, ensure_state_table, lock_state_ddl, qualified, table_columns
from .partitions import children, marked_tables
from .relationships import DESTRUCTIVE, ForeignKey, fingerprint_query

RUNS_TABLE = "retention_runs"


@dataclass(frozen=True)
class Filter:
    """A structured row filter (mirrors api.retentionpolicy.RowFilter)."""

    column: str
    operator: str
    values: tuple[str, ...] = ()


def relation(schema: str, table: str, partitioned: bool) -> sql.Composed:
    """A table's own rows: ``ONLY`` for a plain table, so the rows of tables that INHERIT from it
    (other columns, other ctids) are never read, matched by ctid or deleted, as foreign keys and
    their ON DELETE actions never see them either; a partitioned table has rows only in its
    partitions."""
    name = qualified(schema, table)
    return name if partitioned else sql.Composed([sql.SQL("ONLY "), name])


@dataclass(frozen=True)
class ChildPlan:
    """What a batch does to the rows of one table that reference the rows it removes.

    ``effect``: ``archive`` (moved into its own archive table, children first),
    ``delete`` (deleted by the batch itself, counted), ``setNull`` / ``setDefault``
    (left to the database's ON DELETE action, counted), ``skipParent`` (a parent with
    such children stays, counted). A self-reference (``fk.self_reference``) with
    ``archive`` or ``delete`` makes its table's removed set recursive: descendants go too.
    """

    fk: ForeignKey
    effect: str
    mode: str | None = None
    archive_schema: str | None = None
    archive_table: str | None = None
    columns: tuple[str, ...] = ()
    partitioned: bool = False
    children: tuple[ChildPlan, ...] = ()

    @property
    def removes(self) -> bool:
        return self.effect in ("archive", "delete")

    @property
    def archive(self) -> sql.Composed | None:
        if self.effect != "archive" or self.archive_table is None:
            return None
        return qualified(self.archive_schema or self.fk.schema, self.archive_table)

    @property
    def scan(self) -> sql.Composed:
        return relation(self.fk.schema, self.fk.table, self.partitioned)

    def walk(self) -> Iterator[ChildPlan]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Target:
    """Everything a batch statement needs; built by pgscale.retention.plan()."""

    schema: str
    table: str
    columns: tuple[str, ...]
    age_column: str
    age_interval: str
    filters: tuple[Filter, ...] = ()
    archive_schema: str | None = None
    archive_table: str | None = None
    batch_size: int = 1000
    partitioned: bool = False
    key_columns: tuple[str, ...] = ()  # the primary key; empty: rows are named by ctid
    children: tuple[ChildPlan, ...] = ()
    max_batch_size: int = 0  # 0: batch_size
    fingerprint: str = ""  # of the foreign keys into the tables the plan covers, when it was made

    @property
    def tables(self) -> list[tuple[str, str]]:
        """The table and every table the plan reads or changes through foreign keys."""
        out = [(self.schema, self.table)]
        for plan in self.plans():
            if plan.fk.child not in out:
                out.append(plan.fk.child)
        return out

    @property
    def source(self) -> sql.Composed:
        return qualified(self.schema, self.table)

    @property
    def scan(self) -> sql.Composed:
        """The table for reading and deleting rows: its own rows only (see ``relation``)."""
        return relation(self.schema, self.table, self.partitioned)

    @property
    def archive(self) -> sql.Composed | None:
        if self.archive_table is None:
            return None
        return qualified(self.archive_schema or self.schema, self.archive_table)

    def plans(self) -> Iterator[ChildPlan]:
        """Every child plan, depth first."""
        for child in self.children:
            yield from child.walk()

    @property
    def snapshot_checked(self) -> bool:
        """Whether batches must run in REPEATABLE READ.

        When children are archived or keep their parents through a CASCADE / SET NULL / SET
        DEFAULT key, a child inserted after the batch's snapshot but before it locks the parent
        would be invisible to the batch, and the parent's ON DELETE action would then delete
        or change it unseen. (A RESTRICT / NO ACTION key refuses instead: the batch is retried.) In REPEATABLE READ,
        PostgreSQL's foreign-key triggers check for rows newer than the snapshot and fail
        the batch instead (a serialization failure; the batch is retried).
        """
        return any(
            p.effect == "archive"
            or (p.effect == "skipParent" and p.fk.action in DESTRUCTIVE)
            or (p.fk.self_reference and p.removes)  # descendants found in the snapshot go, none deleted
            for p in self.plans()
        )


_COMPARISONS = {"Equals": "=", "NotEquals": "<>", "LessThan": "<", "GreaterThan": ">"}


def predicate(target: Target, alias: str = "s", *, inline: bool = False) -> tuple[sql.Composable, list[Any]]:
    """WHERE clause and parameters: age cutoff AND every filter; values are bound, never spliced.

    Values are sent untyped (psycopg passes str as 'unknown'), so Postgres casts
    each to the column's type: enums, integers and dates compare correctly.
    ``inline`` renders a statement for the database to run on its own (pg_cron): the
    cutoff becomes ``$1`` and values become quoted literals (still untyped), never text
    pasted into SQL.
    """
    a = sql.Identifier(alias)
    cutoff = sql.SQL("$1") if inline else sql.Placeholder("cutoff")
    parts: list[sql.Composable] = [
        sql.SQL("{}.{} < {}").format(a, sql.Identifier(target.age_column), cutoff),
    ]
    params: list[Any] = []
    for i, f in enumerate(target.filters):
        col = sql.SQL("{}.{}").format(a, sql.Identifier(f.column))
        if f.operator == "IsNull":
            parts.append(sql.SQL("{} IS NULL").format(col))
        elif f.operator == "IsNotNull":
            parts.append(sql.SQL("{} IS NOT NULL").format(col))
        elif f.operator in ("In", "NotIn"):
            names = [f"f{i}_{j}" for j in range(len(f.values))]
            placeholders = sql.SQL(", ").join(
                sql.Literal(v) if inline else sql.Placeholder(n) for n, v in zip(names, f.values, strict=True)
            )
            op = sql.SQL("IN" if f.operator == "In" else "NOT IN")
            parts.append(sql.SQL("{} {} ({})").format(col, op, placeholders))
            params += list(zip(names, f.values, strict=True))
        else:
            name = f"f{i}_0"
            value = sql.Literal(f.values[0]) if inline else sql.Placeholder(name)
            parts.append(sql.SQL("{} {} {}").format(col, sql.SQL(_COMPARISONS[f.operator]), value))
            params.append((name, f.values[0]))
    return sql.SQL(" AND ").join(parts), params


def _params(target: Target, cutoff: datetime, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    _, filter_params = predicate(target)
    return {"cutoff": cutoff, **dict(filter_params), **(extra or {})}


def _cols(alias: str, columns: tuple[str, ...] | list[str]) -> sql.Composable:
    a = sql.Identifier(alias)
    return sql.SQL(", ").join(sql.SQL("{}.{}").format(a, sql.Identifier(c)) for c in columns)


def _names(columns: tuple[str, ...] | list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def _references(alias: str, fk: ForeignKey, parents: str) -> sql.Composable:
    """Rows of ``alias`` (the referencing table) whose key points at a row of the ``parents`` CTE.

    One column: ``= ANY(ARRAY(...))``, which the planner turns into an index scan on the
    referencing column; several: a row IN, which it may hash.
    """
    if len(fk.columns) == 1:
        return sql.SQL("{}.{} = ANY (ARRAY(SELECT p.{} FROM {} p))").format(
            sql.Identifier(alias),
            sql.Identifier(fk.columns[0]),
            sql.Identifier(fk.ref_columns[0]),
            sql.Identifier(parents),
        )
    return sql.SQL("({}) IN (SELECT {} FROM {} p)").format(
        _cols(alias, fk.columns), _cols("p", fk.ref_columns), sql.Identifier(parents)
    )


class _Aliases:
    """Fresh names for the CTEs and table aliases of one statement."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"


def _blockers(
    alias: str, table: sql.Composable, plans: tuple[ChildPlan, ...], names: _Aliases
) -> list[tuple[str, sql.Composable]]:
    """Conditions on a row (``alias``, of ``table``) that keep it where it is, each with the constraint
    it counts under.

    A row is kept when a ``skipParent`` child points at it, or when a row that would go with it
    (an archived or deleted child, at any depth) is itself kept. Through a self-reference that
    removes descendants, every descendant is checked (a recursive query from the row), since
    they all go with it.
    """
    out: list[tuple[str, sql.Composable]] = []
    selfs = _self_edges(plans)
    others = tuple(p for p in plans if not (p.fk.self_reference and p.removes))
    if selfs:
        d = names("d")
        inner = _blockers(d, table, others, names)
        if not inner:
            return out
        refs = sorted({c for p in (*others, *selfs) for c in p.fk.ref_columns})
        seed = sql.SQL("SELECT {}").format(_cols(alias, refs))
        step = sql.SQL("SELECT {} FROM {} t JOIN {} ON {}").format(
            _cols("t", refs),
            table,
            sql.Identifier(d),
            sql.SQL(" OR ").join(
                sql.SQL("({}) = ({})").format(_cols("t", e.fk.columns), _cols(d, e.fk.ref_columns)) for e in selfs
            ),
        )
        for label, cond in inner:
            out.append(
                (
                    label,
                    sql.SQL(
                        "EXISTS (WITH RECURSIVE {d}({cols}) AS ({seed} UNION {step}) SELECT 1 FROM {d} WHERE {cond})"
                    ).format(d=sql.Identifier(d), cols=_names(refs), seed=seed, step=step, cond=cond),
                )
            )
        return out
    for plan in plans:
        c = names("k")
        link = sql.SQL("({}) = ({})").format(_cols(c, plan.fk.columns), _cols(alias, plan.fk.ref_columns))
        head = sql.SQL("EXISTS (SELECT 1 FROM {} {} WHERE {}").format(plan.scan, sql.Identifier(c), link)
        if plan.effect == "skipParent":
            out.append((f"skipped: {plan.fk.name}", sql.Composed([head, sql.SQL(")")])))
        elif plan.removes:
            for label, cond in _blockers(c, plan.scan, plan.children, names):
                out.append((label, sql.Composed([head, sql.SQL(" AND "), cond, sql.SQL(")")])))
    return out


def _self_edges(plans: tuple[ChildPlan, ...]) -> list[ChildPlan]:
    return [p for p in plans if p.fk.self_reference and p.removes]


def _closure(
    name: str, table: sql.Composable, partitioned: bool, seed: sql.Composable, edges: list[ChildPlan]
) -> sql.Composable:
    """A recursive CTE: the seed rows' (tableoid,) ctid and referenced columns, plus their descendants
    through the table's self-references (UNION: a cycle in the data ends the recursion)."""
    refs = sorted({c for e in edges for c in e.fk.ref_columns})
    ident = ["tableoid", "ctid"] if partitioned else ["ctid"]
    step = sql.SQL(", ").join([*(sql.SQL("t.") + sql.SQL(i) for i in ident), _cols("t", refs)])
    join = sql.SQL(" OR ").join(
        sql.SQL("({}) = ({})").format(_cols("t", e.fk.columns), _cols("d", e.fk.ref_columns)) for e in edges
    )
    return sql.SQL("{name} AS ({seed} UNION SELECT {step} FROM {table} t JOIN {name} d ON {join})").format(
        name=sql.Identifier(name), seed=seed, step=step, table=table, join=join
    )


def _closure_seed(
    partitioned: bool, refs: list[str], source: sql.Composable, where: sql.Composable | None = None
) -> sql.Composable:
    """The rows a closure starts from, as ``c``: their (tableoid,) ctid and the columns it follows."""
    ident = ["tableoid", "ctid"] if partitioned else ["ctid"]
    cols = sql.SQL(", ").join([*(sql.SQL("c.") + sql.SQL(i) for i in ident), _cols("c", refs)])
    seed = sql.SQL("SELECT {} FROM {} c").format(cols, source)
    return seed if where is None else sql.SQL("{} WHERE {}").format(seed, where)


def _by_ctid(alias: str, partitioned: bool, rows: str) -> sql.Composable:
    if partitioned:
        return sql.SQL("({a}.tableoid, {a}.ctid) IN (SELECT tableoid, ctid FROM {r})").format(
            a=sql.Identifier(alias), r=sql.Identifier(rows)
        )
    return sql.SQL("{}.ctid = ANY (ARRAY(SELECT ctid FROM {}))").format(sql.Identifier(alias), sql.Identifier(rows))


def _children_parts(
    parent: str,
    plans: tuple[ChildPlan, ...],
    names: _Aliases,
    parts: list[sql.Composable],
    counters: list[tuple[str, sql.Composable]],
) -> None:
    """CTEs that archive or delete the children of the rows of ``parent`` (a DELETE ... RETURNING
    CTE), recursively, and count what the database's own actions will change."""
    for plan in plans:
        fk = plan.fk
        table = plan.scan
        label = f"{fk.schema}.{fk.table}"
        if plan.effect == "skipParent" or (plan.fk.self_reference and plan.removes):
            continue  # handled by the blockers, or by the parent's closure
        if plan.effect in ("setNull", "setDefault"):
            counters.append(
                (
                    f"{label} {plan.effect}",
                    sql.SQL("(SELECT count(*) FROM {} c WHERE {})").format(table, _references("c", fk, parent)),
                )
            )
            continue
        selfs = _self_edges(plan.children)
        d = names("d")
        if selfs:
            r = names("r")
            refs = sorted({c for e in selfs for c in e.fk.ref_columns})
            seed = _closure_seed(plan.partitioned, refs, table, _references("c", fk, parent))
            parts.append(_closure(r, table, plan.partitioned, seed, selfs))
            where = _by_ctid("c", plan.partitioned, r)
        else:
            where = _references("c", fk, parent)
        parts.append(sql.SQL("{} AS (DELETE FROM {} c WHERE {} RETURNING c.*)").format(sql.Identifier(d), table, where))
        if plan.archive is not None:
            parts.append(
                sql.SQL("{} AS (INSERT INTO {} ({}) SELECT {} FROM {})").format(
                    sql.Identifier(names("a")),
                    plan.archive,
                    _names(plan.columns),
                    _names(plan.columns),
                    sql.Identifier(d),
                )
            )
        verb = "archived" if plan.effect == "archive" else "deleted"
        counters.append((f"{label} {verb}", sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(d))))
        _children_parts(d, plan.children, names, parts, counters)


def runs_table(state_schema: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(state_schema), sql.Identifier(RUNS_TABLE))


def _page_range(alias: str, inline: bool) -> sql.Composable:
    """The rows on the heap pages [lo, hi) of the table: a TID range scan reads those pages and no
    others (PostgreSQL 14+). Page numbers are bound (``$2`` and ``$4`` for pg_cron); offset 0 sorts
    before every row of its page. On a partitioned table the range applies to each partition."""
    lo, hi = (sql.SQL("$2"), sql.SQL("$4")) if inline else (sql.Placeholder("lo"), sql.Placeholder("hi"))
    return sql.SQL(
        "{a}.ctid >= ('(' || {lo}::bigint || ',0)')::tid AND {a}.ctid < ('(' || {hi}::bigint || ',0)')::tid"
    ).format(a=sql.Identifier(alias), lo=lo, hi=hi)


def batch_statement(
    target: Target, *, locked: bool = False, inline: bool = False, runs: sql.Composable | None = None
) -> sql.Composed:
    """Move (archive) or delete the matching rows of one range of heap pages, with their children,
    atomically: one statement.

    Batches walk the table's pages once, in order, up to the last page it had when the run
    started (``lo`` and ``hi``: page numbers), so a batch reads contiguous pages, a run passes
    over the table once, and rows added after the start (in new pages) belong to the next run.

    Two shapes, with the same outcome:

    - direct (the default): ``DELETE ... WHERE <pages> AND <predicate> RETURNING`` takes and locks
      each row itself. Under READ COMMITTED a row changed since the statement's snapshot is
      re-checked against the predicate in its latest version (EvalPlanQual) and deleted only if it
      still matches; under REPEATABLE READ the batch fails and is retried. The rows archived are
      exactly the versions deleted. A row another transaction holds locked is waited for, at most
      the session's ``lock_timeout`` (the job sets a short one), and then the batch is rolled back
      and run again ``locked``.
    - ``locked``: ``SELECT ... FOR UPDATE SKIP LOCKED`` first, then the DELETE of those rows: rows
      held by others are passed over instead of waited for (the next run takes them). Also the
      shape of a table whose self-reference takes descendants along (they are found from the
      locked rows).

    Children: every table that references removed rows is handled in the same statement
    (archived or deleted before their parents, so an ON DELETE action finds nothing; or
    counted), and parents whose children must stay are left where they are and counted.
    ``runs`` folds the run-log update into the statement: one round trip per batch.

    Returns: rows moved, and the batch's counts per child table and kept parents (jsonb);
    ``inline`` (pg_cron: cutoff, ``lo``, run id and ``hi`` as ``$1`` to ``$4``) returns rows moved only.
    """
    where, _ = predicate(target, inline=inline)
    where = sql.SQL("{} AND {}").format(_page_range("s", inline), where)
    if target.fingerprint:
        # Planned for these foreign keys: if a migration added or changed one since, the batch takes
        # nothing (its ON DELETE action would act unseen), and the run reports it.
        where = sql.SQL("{} AND ({}) = {}").format(
            where, fingerprint_query(target.tables), sql.Literal(target.fingerprint)
        )
    names = _Aliases()
    selfs = _self_edges(target.children)
    locked = locked or bool(selfs)
    parts: list[sql.Composable] = []
    counters: list[tuple[str, sql.Composable]] = []
    if locked:
        _locked_parts(target, where, selfs, names, parts, counters)
    else:
        _direct_parts(target, where, names, parts, counters)
    if target.archive is not None:
        cols = _names(target.columns)
        parts.append(
            sql.SQL("archived AS (INSERT INTO {} ({}) SELECT {} FROM moved)").format(target.archive, cols, cols)
        )
    _children_parts("moved", target.children, names, parts, counters)
    values = sql.SQL(", ").join(sql.SQL("({}, {})").format(sql.Literal(k), v) for k, v in counters)
    parts.append(sql.SQL("mc AS (SELECT count(*) AS n FROM moved)"))
    if counters:
        parts.append(  # a table reached by two paths counts once per label: summed
            sql.SQL(
                "counts AS MATERIALIZED (SELECT k, sum(v)::bigint AS v FROM (VALUES {}) x(k, v) GROUP BY k)"
            ).format(values)
        )
    if runs is not None:
        run_id = sql.SQL("$3") if inline else sql.Placeholder("run")
        archiving = target.archive is not None
        merged = (
            sql.SQL(
                ", tables = (SELECT jsonb_object_agg(k, v) FROM (SELECT k, sum(v)::bigint AS v FROM ("
                "SELECT key, value::bigint FROM jsonb_each_text(coalesce({runs}.tables, '{{}}'::jsonb)) "
                "UNION ALL SELECT k, v FROM counts) y(k, v) WHERE v > 0 GROUP BY k) z)"
            ).format(runs=runs)
            if counters
            else sql.SQL("")
        )
        parts.append(
            sql.SQL(
                "log AS (UPDATE {runs} SET rows_archived = rows_archived + {a}, rows_deleted = rows_deleted + {d}, "
                "batches = batches + 1, updated_at = clock_timestamp(){merged} WHERE id = {run})"
            ).format(
                runs=runs,
                a=sql.SQL("(SELECT n FROM mc)") if archiving else sql.SQL("0"),
                d=sql.SQL("0") if archiving else sql.SQL("(SELECT n FROM mc)"),
                merged=merged,
                run=run_id,
            )
        )
    head = sql.SQL("WITH RECURSIVE " if any(_self_edges(p.children) for p in target.plans()) or selfs else "WITH ")
    body = sql.Composed([head, sql.SQL(", ").join(parts)])
    if inline:
        return sql.Composed([body, sql.SQL(" SELECT (SELECT n FROM mc)")])
    batch_counts = sql.SQL("(SELECT jsonb_object_agg(k, v) FROM counts WHERE v > 0)") if counters else sql.SQL("NULL")
    return sql.Composed([body, sql.SQL(" SELECT (SELECT n FROM mc), {}").format(batch_counts)])


_KEPT = "pgscale kept {}"  # names of the statement's own columns: never a column of the table
_ROW = "pgscale {}"


def _direct_parts(
    target: Target,
    where: sql.Composable,
    names: _Aliases,
    parts: list[sql.Composable],
    counters: list[tuple[str, sql.Composable]],
) -> None:
    """``moved``: the DELETE that takes the range's matching rows itself. Parents that must stay
    (``_blockers``) are left out by the DELETE's own condition, so they are re-checked with the row
    like the predicate; ``kept`` then flags, per constraint, the matching rows of the range that
    the DELETE did not take (the kept ones), for the counts."""
    blockers = _blockers("s", target.scan, target.children, names)
    if not blockers:
        parts.append(sql.SQL("moved AS (DELETE FROM {} s WHERE {} RETURNING s.*)").format(target.scan, where))
        return
    ident = ["tableoid", "ctid"] if target.partitioned else ["ctid"]
    returning = sql.SQL(", ").join(
        [sql.SQL("s.*"), *(sql.SQL("s.{} AS {}").format(sql.SQL(i), sql.Identifier(_ROW.format(i))) for i in ident)]
    )
    parts.append(
        sql.SQL("moved AS (DELETE FROM {} s WHERE {} AND NOT ({}) RETURNING {})").format(
            target.scan, where, sql.SQL(" OR ").join(b for _, b in blockers), returning
        )
    )
    kept = [sql.Identifier(_KEPT.format(i)) for i in range(len(blockers))]
    flags = sql.SQL(", ").join(sql.SQL("{} AS {}").format(b, f) for (_, b), f in zip(blockers, kept, strict=True))
    taken = sql.SQL(" AND ").join(
        sql.SQL("m.{} = s.{}").format(sql.Identifier(_ROW.format(i)), sql.SQL(i)) for i in ident
    )
    parts.append(
        sql.SQL(
            "kept AS MATERIALIZED (SELECT {} FROM {} s WHERE {} AND NOT EXISTS (SELECT 1 FROM moved m WHERE {}))"
        ).format(flags, target.scan, where, taken)
    )
    for (label, _), f in zip(blockers, kept, strict=True):
        counters.append((label, sql.SQL("(SELECT count(*) FROM kept WHERE {})").format(f)))


def _locked_parts(
    target: Target,
    where: sql.Composable,
    selfs: list[ChildPlan],
    names: _Aliases,
    parts: list[sql.Composable],
    counters: list[tuple[str, sql.Composable]],
) -> None:
    """``cand`` locks the range's matching rows (``SKIP LOCKED``), ``flags`` marks the ones that must
    stay (counted), and ``moved`` deletes the rest, with their descendants through a self-reference."""
    keys = target.key_columns
    wanted = list(keys)  # what the batch keeps of each row: the key, the columns its blockers and closures read
    for plan in target.children:
        wanted += [c for c in plan.fk.ref_columns if c not in wanted]
    ident = ["tableoid", "ctid"] if target.partitioned or selfs else ["ctid"]
    selected: list[sql.Composable] = []
    if not keys or selfs or not target.partitioned:
        selected += [sql.SQL("s.") + sql.SQL(i) for i in ident]
    if wanted:
        selected.append(_cols("s", wanted))
    parts.append(
        sql.SQL("cand AS MATERIALIZED (SELECT {} FROM {} s WHERE {} FOR UPDATE OF s SKIP LOCKED)").format(
            sql.SQL(", ").join(selected), target.scan, where
        )
    )
    blockers = _blockers("c", target.scan, target.children, names)
    if blockers:
        kept = [sql.Identifier(_KEPT.format(i)) for i in range(len(blockers))]
        flags = sql.SQL(", ").join(sql.SQL("{} AS {}").format(b, f) for (_, b), f in zip(blockers, kept, strict=True))
        parts.append(sql.SQL("flags AS MATERIALIZED (SELECT c.*, {} FROM cand c)").format(flags))
        parts.append(sql.SQL("batch AS (SELECT * FROM flags WHERE NOT ({}))").format(sql.SQL(" OR ").join(kept)))
        for (label, _), f in zip(blockers, kept, strict=True):
            counters.append((label, sql.SQL("(SELECT count(*) FROM flags WHERE {})").format(f)))
    else:
        parts.append(sql.SQL("batch AS (SELECT * FROM cand)"))
    if selfs:
        refs = sorted({c for e in selfs for c in e.fk.ref_columns})
        parts.append(
            _closure(
                "r0", target.scan, target.partitioned, _closure_seed(target.partitioned, refs, sql.SQL("batch")), selfs
            )
        )
        match = _by_ctid("t", target.partitioned, "r0")
    elif keys and target.partitioned:
        match = sql.SQL("({}) IN (SELECT {} FROM batch)").format(_cols("t", keys), _names(keys))
    elif target.partitioned:
        match = sql.SQL("(t.tableoid, t.ctid) IN (SELECT tableoid, ctid FROM batch)")
    else:
        match = sql.SQL("t.ctid = ANY (ARRAY(SELECT ctid FROM batch))")
    parts.append(sql.SQL("moved AS (DELETE FROM {} t WHERE {} RETURNING t.*)").format(target.scan, match))


@dataclass
class Batch:
    """What one committed batch did."""

    moved: int  # rows removed from the table (with a self-reference: descendants included)
    tables: dict[str, int]  # per child table and effect, and parents kept per constraint


_STATEMENTS: dict[tuple[Target, bool, str | None], bytes] = {}


def move_batch(
    conn: psycopg.Connection,
    target: Target,
    cutoff: datetime,
    lo: int,
    hi: int,
    *,
    locked: bool = False,
    lock_timeout: str | None = None,
    statement_timeout: str | None = None,
    state_schema: str | None = None,
    run_id: int | None = None,
) -> Batch:
    """Run one batch over the heap pages [lo, hi) as one statement, committed on its own.

    With ``state_schema`` and ``run_id``, the run log is updated by the same statement.
    ``lock_timeout`` / ``statement_timeout``: settings for this batch only (its own transaction).
    """
    runs = runs_table(state_schema) if state_schema is not None and run_id is not None else None
    key = (target, locked, state_schema if runs is not None else None)
    statement = _STATEMENTS.get(key)
    if statement is None:  # the same text every batch: prepared once (see the job's plan_cache_mode)
        statement = _STATEMENTS[key] = batch_statement(target, locked=locked, runs=runs).as_bytes(conn)
    params = _params(target, cutoff, {"lo": lo, "hi": hi, "run": run_id})
    settings = [(n, v) for n, v in (("lock_timeout", lock_timeout), ("statement_timeout", statement_timeout)) if v]
    if settings:
        with conn.transaction():
            for name, value in settings:
                conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            row = conn.execute(statement, params, prepare=True).fetchone()
    else:
        row = conn.execute(statement, params, prepare=True).fetchone()
    if row is None:
        return Batch(0, {})
    return Batch(int(row[0]), dict(row[1] or {}))


def extent_query(target: Target) -> sql.Composed:
    """The table's size in heap pages now (the end of a run's walk; a partitioned table: its largest
    partition) and its rows per page from the statistics (all partitions' rows per page of that
    walk; when never analyzed, the most a page can hold)."""
    name = sql.Literal(target.source.as_string(None))
    rels = (
        sql.SQL("SELECT relid FROM pg_partition_tree({}::regclass) WHERE isleaf").format(name)
        if target.partitioned
        else sql.SQL("SELECT {}::regclass").format(name)
    )
    return sql.SQL(
        "SELECT coalesce(max(pg_relation_size(c.oid)), 0) / current_setting('block_size')::bigint, "
        "coalesce(CASE WHEN min(c.reltuples) >= 0 AND max(c.relpages) > 0 "
        "THEN sum(c.reltuples)::float8 / max(c.relpages) END, current_setting('block_size')::float8 / 28) "
        "FROM pg_class c WHERE c.oid IN ({})"
    ).format(rels)


def heap_extent(conn: psycopg.Connection, target: Target) -> tuple[int, float]:
    """(pages, rows per page): see extent_query."""
    row = conn.execute(extent_query(target)).fetchone()
    assert row is not None
    return int(row[0]), max(float(row[1]), 1.0)


def count_matching(conn: psycopg.Connection, target: Target, cutoff: datetime) -> int:
    """Rows a run would move now (the dry run's answer)."""
    where, _ = predicate(target)
    query = sql.SQL("SELECT count(*) FROM {} s WHERE {}").format(target.scan, where)
    row = conn.execute(query, _params(target, cutoff)).fetchone()
    return int(row[0]) if row else 0


EXACT_COUNT_UP_TO = 200_000


def rows_to_move(conn: psycopg.Connection, target: Target, cutoff: datetime) -> int:
    """How many rows a run will move, for progress: exact when the planner expects few, else its estimate.

    Counting a large table exactly reads all of it once more before the first batch (a few
    percent of a run's time, and the cache it evicts); an ETA needs no more than an estimate.
    """
    where, _ = predicate(target)
    query = sql.SQL("SELECT 1 FROM {} s WHERE {}").format(target.scan, where)
    row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, _params(target, cutoff)).fetchone()
    estimate = int(row[0][0]["Plan"]["Plan Rows"]) if row else 0
    return estimate if estimate > EXACT_COUNT_UP_TO else count_matching(conn, target, cutoff)


def count_referencing(
    conn: psycopg.Connection, target: Target, cutoff: datetime, chain: tuple[ForeignKey, ...]
) -> int | None:
    """Rows of the last table of ``chain`` that point (through the chain) at rows a run would remove now.

    An estimate for status and messages: None when it takes longer than the session allows.
    """
    where, _ = predicate(target)
    inner: sql.Composed = sql.SQL("SELECT {} FROM {} s WHERE {}").format(
        _cols("s", chain[0].ref_columns), target.scan, where
    )
    for i, fk in enumerate(chain):
        alias = f"x{i}"
        cols = chain[i + 1].ref_columns if i + 1 < len(chain) else None
        select = sql.SQL("count(*)") if cols is None else _cols(alias, cols)
        inner = sql.SQL("SELECT {} FROM {} {} WHERE ({}) IN ({})").format(
            select, qualified(fk.schema, fk.table), sql.Identifier(alias), _cols(alias, fk.columns), inner
        )
    try:
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', '10s', true)")
            row = conn.execute(inner, _params(target, cutoff)).fetchone()
    except (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable, psycopg.errors.InsufficientPrivilege):
        return None
    return int(row[0]) if row else 0


def missing_privileges(conn: psycopg.Connection, target: Target) -> list[str]:
    """GRANT statements the session's role lacks for the tables a run reads, locks, moves or deletes.

    Deleting the parent needs nothing on the children (ON DELETE actions run as the table's
    owner), but pgscale's own steps read them (blockers, counts) and delete what it moves.
    """
    # The table itself: SELECT ... FOR UPDATE needs UPDATE too.
    needs: dict[tuple[str, str], set[str]] = {(target.schema, target.table): {"SELECT", "UPDATE", "DELETE"}}
    for plan in target.plans():
        wanted = needs.setdefault(plan.fk.child, set())
        wanted.add("SELECT")
        if plan.removes:
            wanted.add("DELETE")
    out = []
    for (schema, table), privileges in needs.items():
        name = qualified(schema, table).as_string(conn)
        lacking = [
            p
            for p in sorted(privileges)
            if not conn.execute("SELECT has_table_privilege(%s, %s)", (name, p)).fetchone()[0]  # type: ignore[index]
        ]
        if lacking:
            role = sql.Identifier(str(conn.info.user)).as_string(conn)
            out.append(f"GRANT {', '.join(lacking)} ON {name} TO {role}")
    return out


def cutoff_for(conn: psycopg.Connection, interval: str) -> datetime:
    """now() - interval, fixed once per run so every batch uses the same cutoff."""
    row = conn.execute("SELECT now() - %s::interval", (interval,)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


# --- archive table ---------------------------------------------------------------------


def primary_key(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    """Columns of a table's primary key, in key order."""
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum "
        "WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary ORDER BY k.ord",
        (schema, table),
    ).fetchall()
    return [r[0] for r in rows]


def archive_problems(source: dict[str, Column], archive: dict[str, Column]) -> list[str]:
    """Why an existing archive table cannot take the source's rows unchanged (pure)."""
    problems = []
    for name, col in source.items():
        other = archive.get(name)
        if other is None:
            problems.append(f"column {name!r} ({col.type}) is missing")
        elif other.type != col.type:
            problems.append(f"column {name!r} is {other.type}, the source has {col.type}")
    return problems


def create_archive(conn: psycopg.Connection, target: Target) -> None:
    """Create the archive table with the source's columns, defaults and primary key.

    The primary key makes a duplicate archive row impossible: a batch that would
    insert one fails and rolls back whole, deleting nothing.
    """
    assert target.archive_table is not None
    create_like(conn, (target.schema, target.table), (target.archive_schema or target.schema, target.archive_table))


def create_child_archive(conn: psycopg.Connection, child: ChildPlan) -> None:
    """The archive table of a referencing table, made like create_archive() makes the policy's."""
    assert child.archive_table is not None
    create_like(conn, child.fk.child, (child.archive_schema or child.fk.schema, child.archive_table))


def create_like(conn: psycopg.Connection, source: tuple[str, str], archive: tuple[str, str]) -> None:
    """A table with the columns, defaults and primary key of another (archives, and restores into a side schema)."""
    with conn.transaction():
        ensure_schema(conn, archive[0])
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING COMMENTS)").format(
                qualified(*archive), qualified(*source)
            )
        )
        pk = primary_key(conn, *source)
        if pk and not primary_key(conn, *archive):
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    qualified(*archive), sql.SQL(", ").join(sql.Identifier(c) for c in pk)
                )
            )


def archive_columns(conn: psycopg.Connection, target: Target) -> dict[str, Column] | None:
    """The archive table's columns, or None when it does not exist."""
    assert target.archive_table is not None
    return table_columns(conn, target.archive_schema or target.schema, target.archive_table)


# --- run log ---------------------------------------------------------------------------


def ensure_run_log(conn: psycopg.Connection, state_schema: str) -> None:
    """pgscale's run log: one row per run of a policy (CronJob or by hand)."""
    ensure_state_table(
        conn,
        state_schema,
        RUNS_TABLE,
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, policy text NOT NULL, "
        "started_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), "
        "ended_at timestamptz, outcome text NOT NULL DEFAULT 'Running', dry_run boolean NOT NULL DEFAULT false, "
        "rows_total bigint, rows_archived bigint NOT NULL DEFAULT 0, rows_deleted bigint NOT NULL DEFAULT 0, "
        "rows_matched bigint, batches integer NOT NULL DEFAULT 0, message text, tables jsonb",
    )
    with conn.transaction():
        lock_state_ddl(conn)
        if "tables" not in (table_columns(conn, state_schema, RUNS_TABLE) or {}):  # made by an earlier version
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS tables jsonb").format(runs_table(state_schema))
            )
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {}.{} (policy, id DESC)").format(
                sql.Identifier(f"{RUNS_TABLE}_policy_idx"), sql.Identifier(state_schema), sql.Identifier(RUNS_TABLE)
            )
        )


def _runs(state_schema: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(state_schema), sql.Identifier(RUNS_TABLE))


def run_lock_key(policy: str) -> int:
    """A stable 64-bit advisory-lock key per policy: one run at a time, job or pg_cron."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"pgscale-retention:{policy}".encode()).digest()[:8], "big", signed=True)


def try_run_lock(conn: psycopg.Connection, policy: str) -> bool:
    """Take the policy's run lock for this session (released when the connection closes)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (run_lock_key(policy),)).fetchone()
    return bool(row and row[0])


def run_lock_held(conn: psycopg.Connection, policy: str) -> bool:
    """Whether some session runs the policy now (looks at pg_locks; takes nothing)."""
    key = run_lock_key(policy) & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = %s AND objid = %s AND objsubid = 1 AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database()))",
        (key >> 32, key & 0xFFFFFFFF),
    ).fetchone()
    return bool(row and row[0])


INTERRUPTED = (
    "interrupted: the run stopped without finishing (killed or lost its connection); "
    "every committed batch is complete, the next run continues"
)


def mark_interrupted(conn: psycopg.Connection, state_schema: str, policy: str) -> int:
    """Runs logged as Running while nobody holds the policy's run lock: they died."""
    if table_columns(conn, state_schema, RUNS_TABLE) is None or run_lock_held(conn, policy):
        return 0
    cur = conn.execute(
        sql.SQL(
            "UPDATE {} SET outcome = 'Failed', ended_at = updated_at, message = %s "
            "WHERE policy = %s AND outcome = 'Running'"
        ).format(_runs(state_schema)),
        (INTERRUPTED, policy),
    )
    return cur.rowcount


def start_run(conn: psycopg.Connection, state_schema: str, policy: str, *, dry_run: bool) -> int:
    """Record a new run (the caller holds the run lock, so older Running rows are dead)."""
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "UPDATE {} SET outcome = 'Failed', ended_at = updated_at, message = %s "
                "WHERE policy = %s AND outcome = 'Running'"
            ).format(_runs(state_schema)),
            (INTERRUPTED, policy),
        )
        row = conn.execute(
            sql.SQL("INSERT INTO {} (policy, dry_run) VALUES (%s, %s) RETURNING id").format(_runs(state_schema)),
            (policy, dry_run),
        ).fetchone()
    assert row is not None
    return int(row[0])


def record_batch(conn: psycopg.Connection, state_schema: str, run_id: int, *, archived: int, deleted: int) -> None:
    """Count a batch; called inside the batch's own transaction."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET rows_archived = rows_archived + %s, rows_deleted = rows_deleted + %s, "
            "batches = batches + 1, updated_at = clock_timestamp() WHERE id = %s"
        ).format(_runs(state_schema)),
        (archived, deleted, run_id),
    )


def update_run(conn: psycopg.Connection, state_schema: str, run_id: int, **fields: Any) -> None:
    """Set fields of a run (outcome, message, rows_total, rows_matched, ended)."""
    ended = fields.pop("ended", False)
    assignments: list[sql.Composable] = [sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields]
    assignments.append(sql.SQL("updated_at = clock_timestamp()"))
    if ended:
        assignments.append(sql.SQL("ended_at = clock_timestamp()"))
    conn.execute(
        sql.SQL("UPDATE {} SET {} WHERE id = %s").format(_runs(state_schema), sql.SQL(", ").join(assignments)),
        [*fields.values(), run_id],
    )


class RunRow(TypedDict):
    """A run-log row, as :func:`summary` reads it."""

    id: int
    started_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    outcome: str
    dry_run: bool
    rows_total: int | None
    rows_archived: int
    rows_deleted: int
    rows_matched: int | None
    batches: int
    message: str | None
    tables: dict[str, int] | None


@dataclass
class RunSummary:
    """The latest run of a policy and totals over all runs."""

    last: RunRow | None = None
    runs: int = 0
    rows_archived: int = 0
    rows_deleted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def summary(conn: psycopg.Connection, state_schema: str, policy: str) -> RunSummary:
    """What status shows: the last run, and totals since the policy was created."""
    if table_columns(conn, state_schema, RUNS_TABLE) is None:
        return RunSummary()
    cur = conn.execute(
        sql.SQL(
            "SELECT id, started_at, updated_at, ended_at, outcome, dry_run, rows_total, rows_archived, "
            "rows_deleted, rows_matched, batches, message, tables FROM {} WHERE policy = %s ORDER BY id DESC LIMIT 1"
        ).format(_runs(state_schema)),
        (policy,),
    )
    row = cur.fetchone()
    names = [d.name for d in cur.description or []]
    totals = conn.execute(
        sql.SQL(
            "SELECT count(*), coalesce(sum(rows_archived), 0), coalesce(sum(rows_deleted), 0) FROM {} "
            "WHERE policy = %s AND NOT dry_run"
        ).format(_runs(state_schema)),
        (policy,),
    ).fetchone()
    assert totals is not None
    return RunSummary(
        last=cast("RunRow", dict(zip(names, row, strict=True))) if row else None,
        runs=int(totals[0]),
        rows_archived=int(totals[1]),
        rows_deleted=int(totals[2]),
    )


# --- whole partitions ------------------------------------------------------------------

DETACHED_MARK = "pgscale-retention:"


@dataclass(frozen=True)
class Partition:
    """A child of a range-partitioned table."""

    schema: str
    name: str
    upper: str | None  # the bound as Postgres prints it; None for DEFAULT or MAXVALUE
    detach_pending: bool = False


def partitions(conn: psycopg.Connection, schema: str, table: str) -> list[Partition]:
    """Direct partitions with their upper bound text."""
    out = []
    for child in children(conn, schema, table):
        nsp, name, bound, pending = child.schema, child.name, child.bound, child.detach_pending
        upper = None
        if bound and " TO (" in bound and "MAXVALUE" not in bound.split(" TO (")[1]:
            upper = bound.split(" TO (")[1].rstrip(")").strip().strip("'")
        out.append(Partition(nsp, name, upper, bool(pending)))
    return out


def expired(conn: psycopg.Connection, parts: list[Partition], cutoff: datetime, column_type: str) -> list[Partition]:
    """Partitions whose whole range lies before the cutoff (compared by Postgres, in the key's type)."""
    out = []
    for part in parts:
        if part.upper is None:
            continue
        # column_type is format_type() output from the catalog, never spec text.
        row = conn.execute(
            sql.SQL("SELECT CAST(%s AS {}) <= CAST(%s AS {})").format(sql.SQL(column_type), sql.SQL(column_type)),
            (part.upper, cutoff),
        ).fetchone()
        if row and row[0]:
            out.append(part)
    return out


def detach(conn: psycopg.Connection, target: Target, part: Partition, policy: str, *, concurrently: bool) -> None:
    """Detach a partition and mark it, so an interrupted archive of it is found and finished."""
    child = qualified(part.schema, part.name)
    # Marked first, while still attached: whatever happens after, the next run finds the table.
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(child, sql.Literal(f"{DETACHED_MARK}{policy}")))
    if concurrently and not part.detach_pending:
        # CONCURRENTLY cannot run in a transaction block (autocommit connection).
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(target.source, child))
        return
    suffix = sql.SQL(" FINALIZE") if part.detach_pending else sql.SQL("")
    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}{}").format(target.source, child, suffix))


def detached_leftovers(conn: psycopg.Connection, policy: str) -> list[Partition]:
    """Partitions this policy detached but did not finish archiving (a crash in between)."""
    return [Partition(schema, name, None) for schema, name in marked_tables(conn, f"{DETACHED_MARK}{policy}")]


def archive_detached(conn: psycopg.Connection, target: Target, part: Partition, state_schema: str, run_id: int) -> int:
    """Copy a detached partition into the archive (if archiving), verify the count, drop it.

    One transaction, with the run-log update: either the rows are in the archive and
    the partition is gone, or nothing changed.
    """
    child = qualified(part.schema, part.name)
    with conn.transaction():
        # A whole partition is copied in one statement: statementTimeout (sized for batches) does not apply.
        conn.execute("SELECT set_config('statement_timeout', '0', true)")
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(child)).fetchone()
        rows = int(row[0]) if row else 0
        if target.archive is not None:
            cols = sql.SQL(", ").join(sql.Identifier(c) for c in target.columns)
            cur = conn.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(target.archive, cols, cols, child)
            )
            if cur.rowcount != rows:
                raise RuntimeError(f"archived {cur.rowcount} of {rows} rows of {part.name}; nothing dropped")
        conn.execute(sql.SQL("DROP TABLE {}").format(child))
        archiving = target.archive is not None
        record_batch(conn, state_schema, run_id, archived=rows if archiving else 0, deleted=0 if archiving else rows)
    return rows


# --- pg_cron ---------------------------------------------------------------------------

CONFIG_TABLE = "retention_config"


def cron_database(conn: psycopg.Connection) -> str | None:
    """The database pg_cron keeps its jobs in, or None when pg_cron is not loaded."""
    row = conn.execute("SELECT current_setting('cron.database_name', true)").fetchone()
    return row[0] if row and row[0] else None


def has_extension(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = %s", (name,)).fetchone()
    return row is not None


def ensure_procedure(conn: psycopg.Connection, state_schema: str) -> None:
    """The procedure pg_cron calls: the same batches and run log as `pgscale job retention`.

    It runs statements rendered by pgscale (retention_config.batch_sql and locked_sql) with the
    cutoff, the page range and the run id as parameters, walks the table's pages up to the
    last one it had at the start, commits after every batch, and stops at max_run.
    """
    s = sql.Identifier(state_schema)
    with conn.transaction():
        lock_state_ddl(conn)
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {s}.{cfg} (policy text PRIMARY KEY, batch_sql text NOT NULL, "
                "count_sql text NOT NULL, age interval NOT NULL, batch_size integer NOT NULL, "
                "archiving boolean NOT NULL, dry_run boolean NOT NULL, lock_timeout text NOT NULL, "
                "statement_timeout text NOT NULL, max_run interval NOT NULL, pause double precision NOT NULL, "
                "lock_key bigint NOT NULL DEFAULT 0, isolation text NOT NULL DEFAULT '', "
                "check_sql text NOT NULL DEFAULT 'SELECT repeat(''x'', 0)', fingerprint text NOT NULL DEFAULT '', "
                "locked_sql text NOT NULL DEFAULT '', extent_sql text NOT NULL DEFAULT '', "
                "row_lock_wait text NOT NULL DEFAULT '', "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(s=s, cfg=sql.Identifier(CONFIG_TABLE))
        )
        if "row_lock_wait" not in (table_columns(conn, state_schema, CONFIG_TABLE) or {}):
            conn.execute(  # tables created by an earlier version lack them
                sql.SQL(
                    "ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS lock_key bigint NOT NULL DEFAULT 0, "
                    "ADD COLUMN IF NOT EXISTS isolation text NOT NULL DEFAULT '', "
                    "ADD COLUMN IF NOT EXISTS check_sql text NOT NULL DEFAULT 'SELECT repeat(''x'', 0)', "
                    "ADD COLUMN IF NOT EXISTS fingerprint text NOT NULL DEFAULT '', "
                    "ADD COLUMN IF NOT EXISTS locked_sql text NOT NULL DEFAULT '', "
                    "ADD COLUMN IF NOT EXISTS extent_sql text NOT NULL DEFAULT '', "
                    "ADD COLUMN IF NOT EXISTS row_lock_wait text NOT NULL DEFAULT ''"
                ).format(s, sql.Identifier(CONFIG_TABLE))
            )
        conn.execute(
            sql.SQL(
                """CREATE OR REPLACE PROCEDURE {s}.retention_run(p_policy text) LANGUAGE plpgsql AS $proc$
DECLARE
  cfg {s}.{cfg}%ROWTYPE;
  v_cutoff timestamptz;
  v_deadline timestamptz;
  v_moved bigint;
  v_run bigint;
  v_retries integer := 0;
  v_fingerprint text;
  v_end bigint;
  v_density double precision;
  v_pages bigint;
  v_lo bigint := 0;
  v_hi bigint;
  v_locked boolean := false;
BEGIN
  SELECT * INTO cfg FROM {s}.{cfg} WHERE policy = p_policy;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgscale: no retention configuration for %', p_policy;
  END IF;
  IF cfg.extent_sql = '' OR cfg.row_lock_wait = '' THEN
    RAISE EXCEPTION 'pgscale: the retention configuration of % was written by an older pgscale; '
                    'the operator rewrites it at its next reconcile', p_policy;
  END IF;
  IF NOT pg_try_advisory_lock(cfg.lock_key) THEN
    RAISE NOTICE 'pgscale: another run of % is in progress; skipping', p_policy;
    RETURN;
  END IF;
  UPDATE {s}.{runs} SET outcome = 'Failed', ended_at = updated_at,
    message = 'interrupted: the run stopped without finishing; every committed batch is complete'
    WHERE policy = p_policy AND outcome = 'Running';
  INSERT INTO {s}.{runs} (policy, dry_run) VALUES (p_policy, cfg.dry_run) RETURNING id INTO v_run;
  COMMIT;
  PERFORM set_config('TimeZone', 'UTC', false);
  PERFORM set_config('lock_timeout', cfg.lock_timeout, false);
  PERFORM set_config('statement_timeout', cfg.statement_timeout, false);
  v_cutoff := now() - cfg.age;
  v_deadline := clock_timestamp() + cfg.max_run;
  IF cfg.dry_run THEN
    EXECUTE cfg.count_sql INTO v_moved USING v_cutoff;
    UPDATE {s}.{runs} SET outcome = 'DryRun', rows_matched = v_moved, ended_at = clock_timestamp(),
      updated_at = clock_timestamp(), message = v_moved || ' rows match; none moved' WHERE id = v_run;
    COMMIT;
    RETURN;
  END IF;
  -- The walk: the table's pages as they are now (pages added later belong to the next run), in
  -- ranges holding about batch_size rows.
  EXECUTE cfg.extent_sql INTO v_end, v_density;
  v_pages := greatest(1, ceil(cfg.batch_size / greatest(v_density, 1)));
  IF cfg.isolation <> '' THEN
    -- Children archived or kept: REPEATABLE READ, so a child newer than a batch's snapshot
    -- fails the batch (retried) instead of being deleted by its parent's ON DELETE action.
    PERFORM set_config('default_transaction_isolation', cfg.isolation, false);
  END IF;
  COMMIT;
  WHILE v_lo < v_end LOOP
    v_hi := least(v_lo + v_pages, v_end);
    BEGIN
      -- The statement updates the run log itself ($3), in the same transaction.
      IF v_locked THEN
        -- Rows held by others are passed over (SKIP LOCKED), waited for by no one.
        EXECUTE cfg.locked_sql INTO v_moved USING v_cutoff, v_lo, v_run, v_hi;
      ELSE
        -- The DELETE takes the rows itself; a row held by another transaction is waited for this
        -- long at most, then the range runs again locked.
        PERFORM set_config('lock_timeout', cfg.row_lock_wait, true);
        EXECUTE cfg.batch_sql INTO v_moved USING v_cutoff, v_lo, v_run, v_hi;
      END IF;
    EXCEPTION WHEN lock_not_available OR serialization_failure OR deadlock_detected OR foreign_key_violation
                   OR query_canceled THEN
      IF SQLSTATE = '55P03' AND NOT v_locked THEN
        v_locked := true;
        v_moved := -2;
      ELSE
        v_retries := v_retries + 1;
        IF v_retries > 10 THEN
          RAISE;
        END IF;
        v_moved := -1;
      END IF;
    END;
    COMMIT;
    IF v_moved = -1 THEN
      PERFORM pg_sleep(0.2 * v_retries);
      CONTINUE;
    ELSIF v_moved = -2 THEN
      CONTINUE;
    END IF;
    v_retries := 0;
    v_locked := false;
    v_lo := v_hi;
    EXIT WHEN v_lo >= v_end;
    IF clock_timestamp() > v_deadline THEN
      UPDATE {s}.{runs} SET outcome = 'Partial', ended_at = clock_timestamp(), updated_at = clock_timestamp(),
        message = 'max run time reached; the next run continues' WHERE id = v_run;
      COMMIT;
      RETURN;
    END IF;
    PERFORM pg_sleep(cfg.pause);
  END LOOP;
  EXECUTE cfg.check_sql INTO v_fingerprint;
  IF v_fingerprint IS DISTINCT FROM cfg.fingerprint THEN
    UPDATE {s}.{runs} SET outcome = 'Failed', ended_at = clock_timestamp(), updated_at = clock_timestamp(),
      message = 'foreign keys into the tables this policy moves changed since the operator planned its batches; '
                || 'the batches after the change moved nothing; the operator plans again at its next reconcile'
      WHERE id = v_run;
    COMMIT;
    RETURN;
  END IF;
  UPDATE {s}.{runs} SET outcome = 'Succeeded', ended_at = clock_timestamp(), updated_at = clock_timestamp(),
    message = (rows_archived + rows_deleted) || ' rows ' ||
              CASE WHEN cfg.archiving THEN 'archived' ELSE 'deleted' END || ' by pg_cron'
    WHERE id = v_run;
  COMMIT;
END
$proc$"""
            ).format(s=s, cfg=sql.Identifier(CONFIG_TABLE), runs=sql.Identifier(RUNS_TABLE))
        )


def save_config(conn: psycopg.Connection, state_schema: str, policy: str, target: Target, **settings: Any) -> None:
    """Store the rendered statements and settings the procedure runs with."""
    runs = runs_table(state_schema)
    batch_sql = batch_statement(target, inline=True, runs=runs).as_string(conn)
    locked_sql = batch_statement(target, locked=True, inline=True, runs=runs).as_string(conn)
    where, _ = predicate(target, inline=True)
    count_sql = sql.SQL("SELECT count(*) FROM {} s WHERE {}").format(target.scan, where).as_string(conn)
    row = {
        "batch_sql": batch_sql,
        "locked_sql": locked_sql,
        "count_sql": count_sql,
        "extent_sql": extent_query(target).as_string(conn),
        "age": target.age_interval,
        "batch_size": target.batch_size,
        "archiving": target.archive is not None,
        "lock_key": run_lock_key(policy),
        "fingerprint": target.fingerprint,
        "check_sql": fingerprint_query(target.tables).as_string(conn),
        "isolation": "repeatable read" if target.snapshot_checked else "",
        **settings,
    }
    names = list(row)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.{} (policy, {}) VALUES (%s, {}) ON CONFLICT (policy) DO UPDATE SET {}, updated_at = now()"
        ).format(
            sql.Identifier(state_schema),
            sql.Identifier(CONFIG_TABLE),
            sql.SQL(", ").join(sql.Identifier(n) for n in names),
            sql.SQL(", ").join(sql.Placeholder() for _ in names),
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names),
        ),
        [policy, *row.values()],
    )


def delete_config(conn: psycopg.Connection, state_schema: str, policy: str) -> None:
    if table_columns(conn, state_schema, CONFIG_TABLE) is not None:
        conn.execute(
            sql.SQL("DELETE FROM {}.{} WHERE policy = %s").format(
                sql.Identifier(state_schema), sql.Identifier(CONFIG_TABLE)
            ),
            (policy,),
        )


def cron_command(state_schema: str, policy: str) -> sql.Composed:
    """What pg_cron runs."""
    return sql.SQL("CALL {}.retention_run({})").format(sql.Identifier(state_schema), sql.Literal(policy))


def cron_schedule(cron: psycopg.Connection, job_name: str, schedule: str, command: str, database: str) -> int:
    """Create or update a pg_cron job (by name) in a database; returns its id."""
    row = cron.execute(
        "SELECT cron.schedule_in_database(%s, %s, %s, %s)", (job_name, schedule, command, database)
    ).fetchone()
    assert row is not None
    return int(row[0])


def cron_unschedule(cron: psycopg.Connection, job_name: str) -> bool:
    """Remove a pg_cron job by name; False when there was none."""
    row = cron.execute("SELECT jobid FROM cron.job WHERE jobname = %s", (job_name,)).fetchone()
    if row is None:
        return False
    cron.execute("SELECT cron.unschedule(%s::bigint)", (row[0],))
    return True
