"""SQL of RetentionPolicy: the batch move, the archive table and the run log.

Why one statement per batch: ``INSERT INTO archive SELECT ...`` followed by a
separate ``DELETE`` reads two snapshots under READ COMMITTED, so a row changed
in between is deleted without being archived, or archived stale. Here each batch
is a single statement, ``WITH batch AS MATERIALIZED (SELECT ... FOR UPDATE SKIP
LOCKED LIMIT n), moved AS (DELETE ... RETURNING) INSERT INTO archive SELECT ...
FROM moved``: the rows are locked, re-checked against the predicate in their
latest committed version, deleted and archived atomically, and the run log row
is updated in the same transaction, so a crash loses nothing and repeats nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from . import Column, ensure_schema, ensure_state_table, lock_state_ddl, qualified, table_columns
from .partitions import children, marked_tables

RUNS_TABLE = "retention_runs"


@dataclass(frozen=True)
class Filter:
    """A structured row filter (mirrors api.retentionpolicy.RowFilter)."""

    column: str
    operator: str
    values: tuple[str, ...] = ()


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

    @property
    def source(self) -> sql.Composed:
        return qualified(self.schema, self.table)

    @property
    def archive(self) -> sql.Composed | None:
        if self.archive_table is None:
            return None
        return qualified(self.archive_schema or self.schema, self.archive_table)


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


def _row_match(target: Target) -> tuple[sql.Composable, sql.Composable]:
    """How a batch names its rows, in a form the planner turns into index or TID lookups.

    By primary key when there is one (an index scan per row); otherwise by ctid with
    ``= ANY(ARRAY(...))`` (a TID scan); a join on ctid would scan the whole table.
    """
    if target.key_columns:
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in target.key_columns)
        select = sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in target.key_columns)
        tkeys = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in target.key_columns)
        return select, sql.SQL("({}) IN (SELECT {} FROM batch)").format(tkeys, keys)
    if target.partitioned:
        return sql.SQL("s.tableoid, s.ctid"), sql.SQL("(t.tableoid, t.ctid) IN (SELECT tableoid, ctid FROM batch)")
    return sql.SQL("s.ctid"), sql.SQL("t.ctid = ANY (ARRAY(SELECT ctid FROM batch))")


def batch_statement(target: Target, *, after: bool = False, upto: bool = False, inline: bool = False) -> sql.Composed:
    """Move (archive) or delete one batch of matching rows, atomically.

    With a primary key, batches walk the key in order (``after``: continue past the
    last key of the previous batch), so a run passes over the table once instead
    of re-scanning it, and its dead tuples, for every batch; ``upto`` stops the walk
    at the highest key the table had when the run started, so a run has a bounded
    scope and never chases an application that keeps inserting. The statement
    returns the number of rows moved and the last key of the batch.
    """
    where, _ = predicate(target, inline=inline)
    keys = target.key_columns
    tuple_ = sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in keys)
    for flag, name, op in ((after, "after", ">"), (upto, "upto", "<=")):
        if flag and keys:
            bound = sql.SQL(", ").join(sql.Placeholder(f"{name}_{i}") for i in range(len(keys)))
            where = sql.SQL("{} AND ({}) {} ({})").format(where, tuple_, sql.SQL(op), bound)
    order = (
        sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in keys))
        if keys
        else sql.SQL("")
    )
    select_key, match = _row_match(target)
    batch = sql.SQL(
        "WITH batch AS MATERIALIZED ("
        "SELECT {key} FROM {source} s WHERE {where}{order} LIMIT {limit} FOR UPDATE OF s SKIP LOCKED), "
        "moved AS (DELETE FROM {source} t WHERE {match} RETURNING t.*)"
    ).format(
        key=select_key,
        source=target.source,
        where=where,
        order=order,
        match=match,
        limit=sql.SQL("$2") if inline else sql.Placeholder("limit"),
    )
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in target.columns)
    parts: list[sql.Composable] = [batch]
    if target.archive is None:
        counted = sql.SQL("moved")
    else:
        parts.append(
            sql.SQL(", archived AS (INSERT INTO {archive} ({cols}) SELECT {cols} FROM moved RETURNING 1)").format(
                archive=target.archive, cols=cols
            )
        )
        counted = sql.SQL("archived")
    if keys and not inline:
        idents = [sql.Identifier(c) for c in keys]
        parts.append(
            sql.SQL(
                " SELECT (SELECT count(*) FROM {counted}), last.* FROM (SELECT 1) one "
                "LEFT JOIN LATERAL (SELECT {keys} FROM batch ORDER BY {desc} LIMIT 1) last ON true"
            ).format(
                counted=counted,
                keys=sql.SQL(", ").join(idents),
                desc=sql.SQL(", ").join(sql.SQL("{} DESC").format(i) for i in idents),
            )
        )
    else:
        parts.append(sql.SQL(" SELECT count(*) FROM {}").format(counted))
    return sql.Composed(parts)


def move_batch(
    conn: psycopg.Connection,
    target: Target,
    cutoff: datetime,
    after: tuple[Any, ...] | None = None,
    upto: tuple[Any, ...] | None = None,
) -> tuple[int, tuple[Any, ...] | None]:
    """Run one batch in the caller's transaction; returns rows moved and the batch's last key."""
    extra: dict[str, Any] = {"limit": target.batch_size}
    for name, bound in (("after", after), ("upto", upto)):
        if bound is not None:
            extra.update({f"{name}_{i}": v for i, v in enumerate(bound)})
    statement = batch_statement(target, after=after is not None, upto=upto is not None)
    row = conn.execute(statement, _params(target, cutoff, extra)).fetchone()
    if row is None:
        return 0, after
    last = tuple(row[1:]) if target.key_columns and row[1] is not None else after
    return int(row[0]), last


def highest_key(conn: psycopg.Connection, target: Target) -> tuple[Any, ...] | None:
    """The largest primary key now (the end of a run's scope), or None without a key or rows."""
    if not target.key_columns:
        return None
    idents = [sql.Identifier(c) for c in target.key_columns]
    query = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT 1").format(
        sql.SQL(", ").join(idents), target.source, sql.SQL(", ").join(sql.SQL("{} DESC").format(i) for i in idents)
    )
    row = conn.execute(query).fetchone()
    return tuple(row) if row else None


def count_matching(conn: psycopg.Connection, target: Target, cutoff: datetime) -> int:
    """Rows a run would move now (the dry run's answer)."""
    where, _ = predicate(target)
    query = sql.SQL("SELECT count(*) FROM {} s WHERE {}").format(target.source, where)
    row = conn.execute(query, _params(target, cutoff)).fetchone()
    return int(row[0]) if row else 0


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
    assert target.archive is not None and target.archive_table is not None
    schema = target.archive_schema or target.schema
    with conn.transaction():
        ensure_schema(conn, schema)
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING COMMENTS)").format(
                target.archive, target.source
            )
        )
        pk = primary_key(conn, target.schema, target.table)
        if pk and not primary_key(conn, schema, target.archive_table):
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    target.archive, sql.SQL(", ").join(sql.Identifier(c) for c in pk)
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
        conn, state_schema, RUNS_TABLE,
        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, policy text NOT NULL, "
        "started_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), "
        "ended_at timestamptz, outcome text NOT NULL DEFAULT 'Running', dry_run boolean NOT NULL DEFAULT false, "
        "rows_total bigint, rows_archived bigint NOT NULL DEFAULT 0, rows_deleted bigint NOT NULL DEFAULT 0, "
        "rows_matched bigint, batches integer NOT NULL DEFAULT 0, message text",
    )  # fmt: skip
    with conn.transaction():
        lock_state_ddl(conn)
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
            sql.SQL("UPDATE {} SET outcome = 'Failed', ended_at = updated_at, message = %s "
                    "WHERE policy = %s AND outcome = 'Running'").format(_runs(state_schema)),
            (INTERRUPTED, policy),
        )  # fmt: skip
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


@dataclass
class RunSummary:
    """The latest run of a policy and totals over all runs."""

    last: dict[str, Any] | None = None
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
            "rows_deleted, rows_matched, batches, message FROM {} WHERE policy = %s ORDER BY id DESC LIMIT 1"
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
        last=dict(zip(names, row, strict=True)) if row else None,
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

    It runs statements rendered by pgscale (retention_config.batch_sql) with the cutoff
    and batch size as parameters, commits after every batch, and stops at max_run.
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
                "lock_key bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(s=s, cfg=sql.Identifier(CONFIG_TABLE))
        )
        conn.execute(  # tables created by an earlier version lack it
            sql.SQL("ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS lock_key bigint NOT NULL DEFAULT 0").format(
                s, sql.Identifier(CONFIG_TABLE)
            )
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
BEGIN
  SELECT * INTO cfg FROM {s}.{cfg} WHERE policy = p_policy;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'pgscale: no retention configuration for %', p_policy;
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
  LOOP
    EXECUTE cfg.batch_sql INTO v_moved USING v_cutoff, cfg.batch_size;
    UPDATE {s}.{runs} SET
      rows_archived = rows_archived + CASE WHEN cfg.archiving THEN v_moved ELSE 0 END,
      rows_deleted = rows_deleted + CASE WHEN cfg.archiving THEN 0 ELSE v_moved END,
      batches = batches + 1, updated_at = clock_timestamp() WHERE id = v_run;
    COMMIT;
    EXIT WHEN v_moved < cfg.batch_size;
    IF clock_timestamp() > v_deadline THEN
      UPDATE {s}.{runs} SET outcome = 'Partial', ended_at = clock_timestamp(), updated_at = clock_timestamp(),
        message = 'max run time reached; the next run continues' WHERE id = v_run;
      COMMIT;
      RETURN;
    END IF;
    PERFORM pg_sleep(cfg.pause);
  END LOOP;
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
    batch_sql = batch_statement(target, inline=True).as_string(conn)
    where, _ = predicate(target, inline=True)
    count_sql = sql.SQL("SELECT count(*) FROM {} s WHERE {}").format(target.source, where).as_string(conn)
    row = {"batch_sql": batch_sql, "count_sql": count_sql, "age": target.age_interval,
           "batch_size": target.batch_size, "archiving": target.archive is not None,
           "lock_key": run_lock_key(policy), **settings}  # fmt: skip
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
