"""`pgscale job retention`: one run of a RetentionPolicy, in committed batches.

Each batch is one transaction: the atomic move statement plus the run-log update.
Killing the process at any point loses nothing (the open batch rolls back) and
repeats nothing (committed batches are gone from the source). SIGTERM stops the
run cleanly after the current batch; the next run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import errors

from .. import pg
from ..api import RETENTION_POLICY
from ..api.retentionpolicy import RetentionPolicySpec
from ..checks import TIME_TYPES, require_column, require_table
from ..durations import seconds
from ..errors import DependencyError, ReconcileError, SpecError
from ..pg import partitions as sqlp
from ..pg import relationships
from ..pg import retention as sqlr
from ..progress import Progress
from ..retention import Relationships, TableFacts, check_archive, plan, plan_relationships
from . import JobInput, start

log = logging.getLogger(__name__)

LOCK_RETRIES = 10


@dataclass
class RunReport:
    """How a run ended (also printed as JSON)."""

    run_id: int | None
    outcome: str
    rows_archived: int = 0
    rows_deleted: int = 0
    rows_matched: int | None = None
    batches: int = 0
    duration_seconds: float = 0.0
    message: str = ""
    partitions: list[str] = field(default_factory=list)  # retired as a whole
    tables: dict[str, int] = field(default_factory=dict)  # per child table and effect; parents skipped
    children: dict[str, int] = field(default_factory=dict)  # dry run: rows per referencing table at stake


def _set(conn: psycopg.Connection, name: str, value: str) -> None:
    conn.execute("SELECT set_config(%s, %s, false)", (name, value))


@dataclass
class Prepared:
    """A checked, planned policy: the batch target, its relationships, the archive tables created now."""

    target: sqlr.Target
    relationships: Relationships
    created: list[str] = field(default_factory=list)


def prepare(conn: psycopg.Connection, spec: RetentionPolicySpec, state_schema: str) -> Prepared:
    """Check the table, plan the batches with every foreign key into the rows they remove,
    make the archive tables and the run log exist.

    Nothing is created while a relationship is unresolved (the caller refuses to run).
    """
    columns = require_table(conn, spec.table)
    require_column(columns, spec.age_column, "ageColumn", spec.table, TIME_TYPES, "timestamp, timestamptz or date")
    for i, row_filter in enumerate(spec.filters):
        require_column(columns, row_filter.column, f"filters[{i}].column", spec.table)
    edges = relationships.reachable(conn, spec.table.schema_, spec.table.name)
    facts = {}
    for fk in edges:
        child_columns = pg.table_columns(conn, fk.schema, fk.table) or {}
        facts[fk.child] = TableFacts(tuple(child_columns), pg.is_partitioned(conn, fk.schema, fk.table))
    rels = plan_relationships(spec, edges, facts)
    target = plan(
        spec,
        columns,
        key_columns=sqlr.primary_key(conn, spec.table.schema_, spec.table.name),
        partitioned=pg.is_partitioned(conn, spec.table.schema_, spec.table.name),
        children=rels.plans,
    )
    prepared = Prepared(target, rels)
    if rels.unresolved:
        return prepared
    if grants := sqlr.missing_privileges(conn, target):
        raise DependencyError(
            f"the role cannot lock, read or move the rows runs of this policy touch: {'; '.join(grants)} "
            "(for a table that references the policy's table, setting spec.children to keep for it needs "
            "only SELECT)",
            reason="InsufficientPrivilege",
        )
    sqlr.ensure_run_log(conn, state_schema)
    if target.archive is not None:
        existing = sqlr.archive_columns(conn, target)
        check_archive(spec, columns, existing)
        if existing is None:
            sqlr.create_archive(conn, target)
            prepared.created.append(f"{target.archive_schema or target.schema}.{target.archive_table}")
    seen: set[tuple[str | None, str | None]] = {(target.archive_schema or target.schema, target.archive_table)}
    for child in target.plans():
        if child.archive is None or (child.archive_schema, child.archive_table) in seen or child.fk.self_reference:
            continue
        seen.add((child.archive_schema, child.archive_table))
        source = pg.table_columns(conn, child.fk.schema, child.fk.table) or {}
        existing = pg.table_columns(conn, child.archive_schema or child.fk.schema, child.archive_table or "")
        field_name = "children.tables"
        if existing is None:
            try:
                sqlr.create_child_archive(conn, child)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise DependencyError(
                    f'the role cannot create the archive table "{child.archive_schema}"."{child.archive_table}" '
                    f'({str(exc).strip()}): grant it CREATE on schema "{child.archive_schema}", or create the '
                    "table yourself with the columns of the table it archives",
                    reason="InsufficientPrivilege",
                ) from exc
            prepared.created.append(f"{child.archive_schema}.{child.archive_table}")
        elif problems := sqlr.archive_problems(source, existing):
            raise SpecError(
                field_name,
                f'archive table "{child.archive_schema}"."{child.archive_table}" cannot hold the rows of '
                f'"{child.fk.schema}"."{child.fk.table}": {"; ".join(problems)}. Add the columns or set '
                "archiveTable for it",
                reason="ArchiveMismatch",
            )
    return prepared


def unresolved_error(prepared: Prepared, at_stake: dict[str, int | None]) -> SpecError:
    """The Stalled condition of a policy whose table is referenced destructively and children is unset."""
    lines = []
    for fk in prepared.relationships.unresolved:
        rows = at_stake.get(fk.name)
        count = "an unknown number of" if rows is None else str(rows)
        lines.append(f"{fk.describe()} ({count} rows reference rows the next run would remove)")
    return SpecError(
        "children.mode",
        "rows of other tables reference the rows this policy removes, and deleting their parents would "
        f"delete or change them: {'; '.join(lines)}. Nothing was changed. Set spec.children.mode "
        "(archive: move them with their parents; delete: let them go as ON DELETE says; keep: skip "
        "parents that have them), or set it per table in spec.children.tables",
        reason="ReferencedByForeignKeys",
    )


def at_stake(conn: psycopg.Connection, prepared: Prepared, cutoff: Any) -> dict[str, int | None]:
    """Rows per constraint that the next run would touch, for status, messages and dry runs."""
    return {
        item.fk.name: sqlr.count_referencing(conn, prepared.target, cutoff, item.chain)
        for item in prepared.relationships.listed
    }


def run(
    job: JobInput,
    *,
    dry_run: bool | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
) -> RunReport:
    """One run: archive or delete every matching row, batch by batch, until done or out of time."""
    spec = RetentionPolicySpec.model_validate(job.spec)
    dry = spec.dry_run if dry_run is None else dry_run
    stop = stop or threading.Event()
    started = time.monotonic()
    deadline = started + seconds(spec.max_run_time)
    pause = seconds(spec.pause_between_batches)
    with pg.connect(job.conn) as conn:
        _set(conn, "TimeZone", "UTC")  # timestamps without time zone are compared as UTC
        _set(conn, "application_name", f"pgscale-retention {job.policy_key}"[:63])
        prepared = prepare(conn, spec, job.state_schema)
        target = prepared.target
        if prepared.relationships.unresolved:
            raise unresolved_error(prepared, at_stake(conn, prepared, sqlr.cutoff_for(conn, target.age_interval)))
        if target.snapshot_checked:
            _set(conn, "default_transaction_isolation", "repeatable read")
        if not sqlr.try_run_lock(conn, job.policy_key):
            return RunReport(None, "Skipped", message=f"another run of {job.policy_key} is in progress")
        run_id = sqlr.start_run(conn, job.state_schema, job.policy_key, dry_run=dry)
        report = RunReport(run_id, "Running")
        try:
            _set(conn, "statement_timeout", f"{int(seconds(spec.statement_timeout) * 1000)}ms")
            _set(conn, "lock_timeout", f"{int(seconds(spec.lock_timeout) * 1000)}ms")
            cutoff = sqlr.cutoff_for(conn, target.age_interval)
            if dry:
                report.rows_matched = sqlr.count_matching(conn, target, cutoff)
                report.outcome = "DryRun"
                report.message = f"{report.rows_matched} rows older than {spec.older_than} match; none moved"
                stake = at_stake(conn, prepared, cutoff)
                for item in prepared.relationships.listed:
                    key = f"{item.fk.schema}.{item.fk.table} via {item.fk.name} ({item.effect})"
                    report.children[key] = stake.get(item.fk.name) or 0
                if report.children:
                    report.message += "; referencing rows: " + ", ".join(
                        f"{k}: {v}" for k, v in report.children.items()
                    )
            else:
                _retire_partitions(conn, job, spec, target, cutoff, report, stop, deadline)
                _run_batches(conn, job, spec, target, cutoff, report, stop, deadline, pause, progress)
        except (psycopg.Error, ReconcileError, RuntimeError) as exc:
            report.outcome = "Failed"
            report.message = f"{type(exc).__name__}: {str(exc).strip()}"
            log.error("retention run %s failed: %s", job.policy_key, report.message)
        report.duration_seconds = round(time.monotonic() - started, 3)
        sqlr.update_run(conn, job.state_schema, run_id, outcome=report.outcome, message=report.message,
                        rows_matched=report.rows_matched, ended=True)  # fmt: skip
    return report


def _retire_partitions(
    conn: psycopg.Connection, job: JobInput, spec: RetentionPolicySpec, target: sqlr.Target, cutoff: Any,
    report: RunReport, stop: threading.Event, deadline: float,
) -> None:  # fmt: skip
    """Whole partitions past the cutoff leave as a unit: no row-by-row DELETE, no dead tuples.

    Only when the table is range-partitioned by the age column alone, no filter
    narrows the rows, and no PartitionPolicy owns the partitions of this table.
    Partitions detached by an interrupted run are finished first, always.
    """
    policy = job.policy_key
    for leftover in sqlr.detached_leftovers(conn, policy):
        report.partitions.append(leftover.name)
        _count(report, target, sqlr.archive_detached(conn, target, leftover, job.state_schema, report.run_id or 0))
    if not (
        spec.partition_aware
        and target.partitioned
        and not spec.filters
        and not target.children  # referenced: rows go batch by batch, with their children
        and not job.options.get("partitionsOwnedElsewhere")
    ):
        return
    if sqlp.range_key(conn, target.schema, target.table) != [target.age_column]:
        return
    parts = sqlr.partitions(conn, target.schema, target.table)
    column_type = pg.table_columns(conn, target.schema, target.table)[target.age_column].type  # type: ignore[index]
    has_default = any(p.upper is None and not p.detach_pending for p in parts)
    concurrently = pg.server_version(conn)[1] >= 140000 and not has_default
    for part in sqlr.expired(conn, parts, cutoff, column_type):
        if stop.is_set() or time.monotonic() > deadline:
            return  # the row batches that follow stop at once; the next run continues here
        for attempt in range(LOCK_RETRIES + 1):
            try:
                sqlr.detach(conn, target, part, policy, concurrently=concurrently)
                break
            except errors.LockNotAvailable:
                if attempt == LOCK_RETRIES:
                    raise
                log.warning("detaching %s gave way to the application; retrying", part.name)
                stop.wait(0.5 * (attempt + 1))
        report.partitions.append(part.name)
        _count(report, target, sqlr.archive_detached(conn, target, part, job.state_schema, report.run_id or 0))


def _count(report: RunReport, target: sqlr.Target, rows: int) -> None:
    if target.archive is not None:
        report.rows_archived += rows
    else:
        report.rows_deleted += rows
    report.batches += 1


BATCH_TIME_SHARE = 0.1  # a batch aims at this share of lockTimeout: what a writer may wait on its rows


def next_batch_size(size: int, taken: int, elapsed: float, *, budget: float, smallest: int, largest: int) -> int:
    """The next batch's size, from how long this one took (pure).

    Batches grow (doubling) while a full one takes under half the aim, and shrink in
    proportion when one takes longer than the aim, so each stays far under the lock
    budget whatever the row width, the indexes and the machine's load.
    """
    aim = max(budget * BATCH_TIME_SHARE, 0.01)
    if elapsed > aim:
        return max(smallest, min(size, int(size * aim / elapsed)))
    if taken >= size and elapsed < aim / 2:
        return min(largest, size * 2)
    return size


RETRYABLE = (
    errors.LockNotAvailable,
    errors.QueryCanceled,
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.ForeignKeyViolation,  # a child appeared after the snapshot under a parent being kept
)


def _run_batches(
    conn: psycopg.Connection,
    job: JobInput,
    spec: RetentionPolicySpec,
    target: sqlr.Target,
    cutoff: Any,
    report: RunReport,
    stop: threading.Event,
    deadline: float,
    pause: float,
    progress: Progress | None,
) -> None:
    try:
        total = sqlr.rows_to_move(conn, target, cutoff)
    except errors.QueryCanceled:
        total = None  # too large to count within statement_timeout: no ETA
    sqlr.update_run(conn, job.state_schema, report.run_id or 0, rows_total=total)
    if progress:
        progress.start(total)
    archiving = target.archive is not None
    failures = 0
    after: tuple[Any, ...] | None = None
    upto = sqlr.highest_key(conn, target)  # rows inserted after this point belong to the next run
    size = target.batch_size
    budget = seconds(spec.lock_timeout)
    while True:
        if stop.is_set():
            report.outcome, report.message = "Partial", "stopped on request after a committed batch"
            return
        if time.monotonic() > deadline:
            report.outcome, report.message = "Partial", f"maxRunTime {spec.max_run_time} reached; next run continues"
            return
        started = time.monotonic()
        try:
            # One statement: the batch, its children and the run log, committed together (autocommit).
            batch = sqlr.move_batch(conn, target, cutoff, after, upto, limit=size,
                                    state_schema=job.state_schema, run_id=report.run_id)  # fmt: skip
        except RETRYABLE as exc:
            failures += 1
            if failures > LOCK_RETRIES:
                raise
            log.warning("batch gave way to the application (%s); retrying", type(exc).__name__)
            if isinstance(exc, errors.LockNotAvailable | errors.QueryCanceled):
                size = max(target.batch_size, size // 2)  # it took too long: smaller; a conflict is retried as is
            stop.wait(max(pause, 0.05 * failures))
            continue
        elapsed = time.monotonic() - started
        failures = 0
        after = batch.last
        _count(report, target, batch.moved)
        for key, value in batch.tables.items():
            report.tables[key] = report.tables.get(key, 0) + int(value)
        if progress:
            progress.advance(batch.moved)
        if batch.taken < size:
            report.outcome = "Succeeded"
            report.message = f"{report.rows_archived + report.rows_deleted} rows older than {spec.older_than} " + (
                f"archived into {target.archive_schema or target.schema}.{target.archive_table}"
                if archiving
                else "deleted"
            )
            if report.partitions:
                report.message += f" ({len(report.partitions)} whole partitions: {', '.join(report.partitions)})"
            if report.tables:
                report.message += "; " + ", ".join(f"{k}: {v}" for k, v in sorted(report.tables.items()))
            return
        size = next_batch_size(size, batch.taken, elapsed, budget=budget, smallest=target.batch_size,
                               largest=max(target.max_batch_size, target.batch_size))  # fmt: skip
        if pause:
            stop.wait(pause)


def main(args: argparse.Namespace) -> int:
    """Entry point of `pgscale job retention`."""
    started = start(RETENTION_POLICY, "retention", args.namespace, args.name)
    if started is None:
        return 2
    job, stop = started
    progress = Progress("retention", stream=sys.stderr, unit="rows")
    try:
        report = run(job, dry_run=True if args.dry_run else None, stop=stop, progress=progress)
    except ReconcileError as exc:  # the spec does not fit the database (checked before a run starts)
        print(f"pgscale job retention: {exc.message}", file=sys.stderr)
        return 1
    progress.finish(report.outcome)
    print(json.dumps(asdict(report)))
    return 1 if report.outcome == "Failed" else 0
