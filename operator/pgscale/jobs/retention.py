"""`pgscale job retention`: one run of a RetentionPolicy, in committed batches.

Each batch is one transaction: the atomic move statement plus the run-log update.
Killing the process at any point loses nothing (the open batch rolls back) and
repeats nothing (committed batches are gone from the source). SIGTERM stops the
run cleanly after the current batch; the next run continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors

from .. import faults, pg
from ..api import RETENTION_POLICY
from ..api.retentionpolicy import RetentionPolicySpec
from ..durations import seconds
from ..errors import ReconcileError, SpecError, TransientError
from ..pg import partitions as sqlp
from ..pg import relationships
from ..pg import retention as sqlr
from ..progress import Progress
from ..retention import (
    at_stake,
    batch_cap,
    batch_pages,
    next_batch_size,
    prepare,
    row_lock_wait,
    unresolved_error,
)
from ..storage import ObjectStore, open_store
from . import JobInput, start

if TYPE_CHECKING:  # jobs/export imports pyarrow: only runs that export load it
    from .export import Exporter

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
    retries: int = 0  # batches rolled back and retried (lock timeouts, serialization failures, ...)
    children: dict[str, int | None] = field(default_factory=dict)  # dry run: rows at stake per key (None: unknown)
    files: int = 0  # action export: files written and verified (manifests not counted)
    bytes_written: int = 0  # action export: bytes uploaded (files and manifests)
    files_reused: int = 0  # action export: objects of interrupted batches found identical and reused


def _set(conn: psycopg.Connection, name: str, value: str) -> None:
    conn.execute("SELECT set_config(%s, %s, false)", (name, value))


# What a run sets on its session (see run() and _export()); a second session of the run gets the same.
SESSION_SETTINGS = (
    "TimeZone",
    "application_name",
    "default_transaction_isolation",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
)


def _twin(conn: psycopg.Connection, other: psycopg.Connection) -> None:
    """Give ``other`` the run's session settings."""
    for name in SESSION_SETTINGS:
        row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        assert row is not None
        _set(other, name, str(row[0]))


def run(
    job: JobInput,
    *,
    dry_run: bool | None = None,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    store: ObjectStore | None = None,
) -> RunReport:
    """One run: archive, export or delete every matching row, batch by batch, until done or out of time.

    ``store``: the export destination (default: opened from spec.export with the pod's environment)."""
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
                    report.children[key] = stake.get(item.fk)
                if report.children:
                    report.message += "; referencing rows: " + ", ".join(
                        f"{k}: {'unknown' if v is None else v}" for k, v in report.children.items()
                    )
            elif spec.action == "export":
                _export(conn, job, spec, target, cutoff, report, stop, deadline, progress, store)
            else:
                _retire_partitions(conn, job, spec, target, cutoff, report, stop, deadline)
                _run_batches(conn, job, spec, target, cutoff, report, stop, deadline, pause, progress)
        except ReconcileError as exc:
            report.outcome = "Failed"
            report.message = exc.message
            log.error("retention run %s failed: %s", job.policy_key, report.message)
        except (psycopg.Error, RuntimeError) as exc:
            report.outcome = "Failed"
            report.message = f"{type(exc).__name__}: {str(exc).strip()}"
            log.error("retention run %s failed: %s", job.policy_key, report.message)
        report.duration_seconds = round(time.monotonic() - started, 3)
        sqlr.update_run(
            conn,
            job.state_schema,
            run_id,
            outcome=report.outcome,
            message=report.message,
            rows_matched=report.rows_matched,
            ended=True,
        )
    return report


def _retire_partitions(
    conn: psycopg.Connection,
    job: JobInput,
    spec: RetentionPolicySpec,
    target: sqlr.Target,
    cutoff: Any,
    report: RunReport,
    stop: threading.Event,
    deadline: float,
    finish: Callable[[sqlr.Partition], int] | None = None,
) -> None:
    """Whole partitions past the cutoff leave as a unit: no row-by-row DELETE, no dead tuples.

    ``finish`` takes a detached partition the rest of the way (action export: its file, then the
    drop); by default it is archived (or, for action delete, dropped).

    Only when the table is range-partitioned by the age column alone, no filter
    narrows the rows, and no PartitionPolicy owns the partitions of this table.
    Partitions detached by an interrupted run are finished first, always.
    """
    policy = job.policy_key

    def done(part: sqlr.Partition) -> None:
        report.partitions.append(part.name)
        if finish is None:
            _count(report, target, sqlr.archive_detached(conn, target, part, job.state_schema, report.run_id or 0))
        else:
            report.rows_archived += finish(part)
            report.batches += 1

    for leftover in sqlr.detached_leftovers(conn, policy):
        done(leftover)
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
        faults.checkpoint("partition-detached")
        done(part)


def _export(
    conn: psycopg.Connection,
    job: JobInput,
    spec: RetentionPolicySpec,
    target: sqlr.Target,
    cutoff: Any,
    report: RunReport,
    stop: threading.Event,
    deadline: float,
    progress: Progress | None,
    store: ObjectStore | None,
) -> None:
    """Action export (jobs/export.py): pending batches first, then whole partitions, then rows. A second
    session of the run lets batches overlap (jobs/export.py)."""
    from .export import Exporter

    if progress:
        progress.start(None)
    # A batch's transaction stays open while its files are uploaded and read back: a server-wide
    # idle_in_transaction_session_timeout shorter than that would end every batch (losing nothing).
    _set(conn, "idle_in_transaction_session_timeout", "0")

    def count(rows: int, tables: dict[str, int]) -> None:
        report.rows_archived += rows
        report.batches += 1
        for key, value in tables.items():
            report.tables[key] = report.tables.get(key, 0) + int(value)

    with contextlib.ExitStack() as sessions:
        second: psycopg.Connection | None = None
        try:
            second = sessions.enter_context(pg.connect(job.conn))
            _twin(conn, second)
        except TransientError as exc:  # a CONNECTION LIMIT, max_connections: batches one after another
            log.warning("export of %s on one session: %s", job.policy_key, exc.message)
        exporter = Exporter(
            conn,
            job,
            spec,
            target,
            store or open_store(spec.export_or_default.destination),
            run_id=report.run_id,
            stop=stop,
            deadline=deadline,
            progress=progress,
            count=count,
            second=second,
        )
        _run_export(
            conn,
            job=job,
            spec=spec,
            target=target,
            cutoff=cutoff,
            report=report,
            stop=stop,
            deadline=deadline,
            exporter=exporter,
        )


def _run_export(
    conn: psycopg.Connection,
    *,
    job: JobInput,
    spec: RetentionPolicySpec,
    target: sqlr.Target,
    cutoff: Any,
    report: RunReport,
    stop: threading.Event,
    deadline: float,
    exporter: Exporter,
) -> None:
    """Whole partitions, then rows."""
    from botocore.exceptions import BotoCoreError, ClientError

    from ..export import export_partition
    from .export import storage_failure

    def finish(part: sqlr.Partition) -> int:
        """A detached partition: one verified file, then dropped."""
        return export_partition(
            conn,
            exporter.store,
            state_schema=job.state_schema,
            policy=job.policy_key,
            source=(target.schema, target.table),
            part=(part.schema, part.name),
            age_column=target.age_column,
            destination=exporter.destination,
            run_id=report.run_id,
            counts=exporter.counts,
        )

    try:
        try:
            _retire_partitions(conn, job, spec, target, cutoff, report, stop, deadline, finish)
        except (BotoCoreError, ClientError, OSError) as exc:
            found = storage_failure(exc, spec)
            raise found or RuntimeError(f"exporting a partition failed: {exc}") from exc
        stopped = exporter.run(cutoff)
    finally:
        report.files += exporter.counts.files
        report.bytes_written += exporter.counts.bytes
        report.files_reused += exporter.counts.reused
    if stopped:
        report.outcome, report.message = "Partial", stopped
        return
    report.outcome = "Succeeded"
    report.message = (
        f"{report.rows_archived} rows older than {spec.older_than} exported into {report.files} Parquet files "
        f"at {exporter.store.location('')}"
    )
    if report.partitions:
        report.message += f" ({len(report.partitions)} whole partitions: {', '.join(report.partitions)})"
    if report.tables:
        report.message += "; " + ", ".join(f"{k}: {v}" for k, v in sorted(report.tables.items()))


def _count(report: RunReport, target: sqlr.Target, rows: int) -> None:
    if target.archive is not None:
        report.rows_archived += rows
    else:
        report.rows_deleted += rows
    report.batches += 1


RETRYABLE = (
    errors.LockNotAvailable,
    errors.QueryCanceled,
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.ForeignKeyViolation,  # a child appeared after the snapshot under a parent being kept
)


def _ms(value: float) -> str:
    """A timeout setting; 0 (or less): none."""
    return f"{max(1, round(value * 1000))}ms" if value > 0 else "0"


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
    # The walk: the table's pages as they are now, once, in ranges sized by time; rows added later
    # (in new pages) belong to the next run.
    end, rows_per_page = sqlr.heap_extent(conn, target)
    smallest, largest = batch_pages(target.batch_size, target.max_batch_size, rows_per_page)
    budget = seconds(spec.lock_timeout)
    lock_timeout, statement_timeout = _ms(budget), _ms(seconds(spec.statement_timeout))
    _set(conn, "lock_timeout", _ms(row_lock_wait(budget)))  # a row held by another transaction: see below
    _set(conn, "statement_timeout", _ms(batch_cap(budget, seconds(spec.statement_timeout))))
    # Batches differ only in bound values (the pages, the cutoff): one plan for all, instead of planning
    # every batch again (a custom plan for each set of values is what PostgreSQL would otherwise keep).
    _set(conn, "plan_cache_mode", "force_generic_plan")
    failures = 0
    pages, lo = smallest, 0
    locked = False  # the next attempt locks its rows first, with SKIP LOCKED
    patient = False  # the next attempt may take the whole statementTimeout
    while lo < end:
        if stop.is_set():
            report.outcome, report.message = "Partial", "stopped on request after a committed batch"
            return
        if time.monotonic() > deadline:
            report.outcome, report.message = "Partial", f"maxRunTime {spec.max_run_time} reached; next run continues"
            return
        hi = min(lo + pages, end)
        started = time.monotonic()
        try:
            # One statement: the batch, its children and the run log, committed together.
            batch = sqlr.move_batch(
                conn,
                target,
                cutoff,
                lo,
                hi,
                locked=locked,
                lock_timeout=lock_timeout if locked else None,
                statement_timeout=statement_timeout if patient else None,
                state_schema=job.state_schema,
                run_id=report.run_id,
            )
        except RETRYABLE as exc:
            report.retries += 1
            if isinstance(exc, errors.LockNotAvailable) and not locked:
                # A row (or the table) was held longer than a batch may wait while it holds the rows it
                # already took: the same pages again, locking first and passing held rows over.
                locked = True
                continue
            if isinstance(exc, errors.QueryCanceled) and not patient:
                # Longer than a batch may hold its rows: half the pages; at the smallest size, the
                # whole statementTimeout.
                pages, patient = (max(smallest, pages // 2), False) if pages > smallest else (pages, True)
                continue
            failures += 1
            if failures > LOCK_RETRIES:
                raise
            log.warning("batch gave way to the application (%s); retrying", type(exc).__name__)
            stop.wait(max(pause, 0.05 * failures))
            continue
        elapsed = time.monotonic() - started
        failures = 0
        locked = patient = False
        lo = hi
        _count(report, target, batch.moved)
        for key, value in batch.tables.items():
            report.tables[key] = report.tables.get(key, 0) + int(value)
        if progress:
            progress.advance(batch.moved)
        pages = next_batch_size(pages, elapsed, moved=batch.moved, budget=budget, smallest=smallest, largest=largest)
        if pause and lo < end:
            stop.wait(pause)
    if target.fingerprint and relationships.fingerprint(conn, target.tables) != target.fingerprint:
        raise SpecError(
            "children",
            "foreign keys into the tables this run moves changed during the run (a migration?); the "
            "batches after the change moved nothing; the next run plans again with them",
            reason="RelationshipsChanged",
        )
    report.outcome = "Succeeded"
    report.message = f"{report.rows_archived + report.rows_deleted} rows older than {spec.older_than} " + (
        f"archived into {target.archive_schema or target.schema}.{target.archive_table}" if archiving else "deleted"
    )
    if report.partitions:
        report.message += f" ({len(report.partitions)} whole partitions: {', '.join(report.partitions)})"
    if report.tables:
        report.message += "; " + ", ".join(f"{k}: {v}" for k, v in sorted(report.tables.items()))


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
