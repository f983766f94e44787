"""Converting a live, non-partitioned table into range partitions: plan (pure) and drive (I/O).

The steps and why each is safe are in ``pg/conversion.py``. This module decides whether
the table can be converted at all (``blockers``: nothing is changed when it cannot), which
partitions the new table starts with, and runs the steps in order, each resumable: the
state row in the profile's state schema says where a killed run stops, and the next run
continues from there. ``budget`` bounds one call (the operator works in slices and
reports progress between them); the CLI runs to the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import psycopg

from . import faults, pg
from .api.partitionpolicy import PartitionPolicySpec
from .checks import base_type
from .errors import DependencyError, SpecError, TransientError
from .events import Event
from .partitioning import Range, add_periods, partition_name, period_start, wanted
from .pg import conversion as sqlc
from .pg import partitions as sqlp
from .progress import eta

log = logging.getLogger(__name__)

MAX_PARTITIONS = 1000  # more than this at conversion time: a coarser interval is the fix


def sql_name(identifier: str) -> str:
    """An identifier as it would be written in SQL, for messages."""
    return f'"{identifier}"' if identifier != identifier.lower() or not identifier.isidentifier() else identifier


@dataclass
class Report:
    """Where a conversion stands after one call."""

    phase: sqlc.Phase
    rows_total: int | None = None
    rows_copied: int = 0
    rows_per_second: float | None = None
    eta_seconds: int | None = None
    longest_lock_ms: int = 0
    lock_retries: int = 0
    started_at: Any = None
    finished: bool = False
    events: list[Event] | None = None


def blockers(shape: sqlc.Shape, spec: PartitionPolicySpec) -> list[str]:
    """Why the table cannot be converted as the spec stands, each with what the spec or the schema can do."""
    name = spec.table.qualified()
    conv = spec.conversion_or_default
    widen = conv.widen_keys
    drop_incoming = conv.drop_referencing_foreign_keys
    out: list[str] = []
    if not shape.primary_key:
        out.append(f"{name} has no primary key; add one (pgscale copies rows by key, exactly once)")
    for index in shape.indexes:
        lacks = spec.column not in index.columns
        if index.constraint_type in ("p", "u") and index.condef and "DEFERRABLE" in index.condef.split(")")[-1]:
            out.append(
                f"key {index.constraint!r} is DEFERRABLE, which cannot arbitrate the copy's ON CONFLICT; make it "
                "NOT DEFERRABLE for the conversion (ALTER TABLE ... DROP CONSTRAINT / ADD ...), or convert by hand"
            )
        elif index.constraint_type == "x":
            out.append(f"exclusion constraint {index.constraint!r} cannot be kept on a partitioned table; drop it")
        elif index.constraint_type in ("p", "u") and lacks and widen and index.widened(spec.column) is None:
            out.append(
                f"key {index.constraint!r} ({index.condef}) has options (INCLUDE, DEFERRABLE, NULLS NOT DISTINCT) "
                f"that pgscale does not widen; re-create it as a plain key including {spec.column!r}"
            )
        elif index.constraint_type in ("p", "u") and lacks and not widen:
            what = "primary key" if index.constraint_type == "p" else "unique constraint"
            out.append(
                f"{what} {index.constraint!r} ({', '.join(index.columns)}) lacks the partition column "
                f"{spec.column!r}; set spec.conversion.widenKeys: true to make it ({', '.join(index.columns)}, "
                f"{spec.column}) (uniqueness then holds per {spec.column})"
            )
        elif index.constraint_type is None and index.unique and lacks:
            out.append(
                f"unique index {index.name!r} lacks the partition column {spec.column!r}; include it, or make it "
                "a UNIQUE constraint and set spec.conversion.widenKeys: true"
            )
        elif index.constraint_type is None and index.tail is None:
            out.append(f"index {index.name!r} has a definition pgscale cannot rebuild: {index.definition}")
    if shape.incoming and not drop_incoming:
        names = ", ".join(f"{fk.name!r} on {fk.table}" for fk in shape.incoming)
        out.append(
            f"foreign keys reference {name} ({names}); Postgres cannot point a foreign key at a "
            "partitioned table's key without the partition column: drop them, or set "
            "spec.conversion.dropReferencingForeignKeys: true to have pgscale drop them at the switch"
        )
    if shape.views:
        out.append(
            f"views depend on {name} ({', '.join(shape.views)}); they would keep reading the old "
            "table: drop them, and re-create them after the conversion"
        )
    if shape.triggers:
        out.append(f"triggers on {name} ({', '.join(shape.triggers)}) are not carried over; drop them first")
    if shape.rls:
        out.append(f"{name} uses row-level security, which pgscale does not carry over; disable it first")
    if shape.publications:
        out.append(
            f"{name} is in publications ({', '.join(shape.publications)}); logical replication "
            "would stop at the switch: remove it from them first"
        )
    if spec.column in shape.generated:
        out.append(f"the partition column {spec.column!r} is generated; partition by a stored, plain column")
    if any(k in shape.generated for k in shape.primary_key):
        out.append("the primary key has a generated column; pgscale copies rows by a plain key")
    widened_pk = any(i.constraint_type == "p" and spec.column not in i.columns for i in shape.indexes)
    if widen and widened_pk and spec.column not in shape.not_null:
        out.append(
            f"{spec.column!r} may be NULL, and a widened primary key makes it NOT NULL: writes of NULL would "
            f"fail; ALTER TABLE {name} ALTER COLUMN {sql_name(spec.column)} SET NOT NULL first"
        )
    if shape.not_valid:
        out.append(
            f"constraints {', '.join(shape.not_valid)} are NOT VALID (rows may break them, and the copy would "
            "enforce them); VALIDATE CONSTRAINT or drop them first"
        )
    if shape.inheritance:
        out.append(f"{name} takes part in table inheritance; pgscale converts plain tables only")
    return out


def starting_ranges(spec: PartitionPolicySpec, table: str, first: Any, last: Any, now: datetime) -> list[Range]:
    """The new table's partitions: every period from the oldest row to the newest, plus the wanted ones."""
    ahead = wanted(spec.interval, spec.time_zone, now, spec.premake, spec.naming_pattern, table)
    start = ahead[0].start
    end = ahead[-1].end
    if first is not None:
        start = min(start, period_start(spec.interval, first))
    if last is not None:
        end = max(end, add_periods(spec.interval, period_start(spec.interval, last), 1))
    out: list[Range] = []
    cursor = start
    while cursor < end:
        nxt = add_periods(spec.interval, cursor, 1)
        out.append(Range(partition_name(spec.naming_pattern, spec.interval, table, cursor), cursor, nxt))
        cursor = nxt
        if len(out) > MAX_PARTITIONS:
            raise SpecError(
                "interval",
                f"the rows of {table} span more than {MAX_PARTITIONS} {spec.interval} partitions "
                f"(from {first} to {last}); choose a coarser interval",
                reason="TooManyPartitions",
            )
    return out


def subject(conn: psycopg.Connection, state_schema: str, spec: PartitionPolicySpec) -> sqlc.Subject:
    """The policy's table, as the SQL of a conversion takes it."""
    return sqlc.Subject(conn, state_schema, spec.table.schema_, spec.table.name)


def lock_ms(spec: PartitionPolicySpec) -> int:
    return spec.conversion_or_default.lock_timeout_ms


def _report(state: sqlc.State | None, now: float | None = None) -> Report:
    if state is None:
        return Report(phase="none")
    rate = None
    left = None
    if state.copy_started_at is not None and state.rows_copied:
        elapsed = max(((state.updated_at - state.copy_started_at).total_seconds()), 1e-3)
        rate = state.rows_copied / elapsed
        left = eta(state.rows_copied, state.rows_total, rate) if state.phase == "prepared" else 0
    return Report(
        phase=state.phase,
        rows_total=state.rows_total,
        rows_copied=state.rows_copied,
        rows_per_second=rate,
        eta_seconds=left,
        longest_lock_ms=state.longest_lock_ms,
        lock_retries=state.lock_retries,
        started_at=state.started_at,
        finished=state.phase == "done",
    )


def status(conn: psycopg.Connection, state_schema: str, spec: PartitionPolicySpec) -> Report:
    """Where the conversion of the policy's table stands, read from its state row."""
    return _report(sqlc.load_state(subject(conn, state_schema, spec)))


RETRYABLE = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)


def _with_lock_retries(
    conn: psycopg.Connection,
    state_schema: str,
    spec: PartitionPolicySpec,
    what: str,
    step: Callable[[], int],
    deadline: float | None,
) -> int:
    """Run a step that must lock the table, retrying while the application holds the lock."""
    schema, table = spec.table.schema_, spec.table.name
    target = subject(conn, state_schema, spec)
    retries = spec.conversion_or_default.max_retries
    for attempt in range(retries + 1):
        try:
            return step()
        except RETRYABLE as exc:
            if sqlc.load_state(target) is not None:
                sqlc.note_retry(target)
            log.info(
                "%s of %s.%s gave way to the application (attempt %d): %s",
                what,
                schema,
                table,
                attempt + 1,
                type(exc).__name__,
            )
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(min(0.2 * (attempt + 1), 2.0))
    raise TransientError(
        f"{what} of {spec.table.qualified()} could not lock the table within spec.conversion.lockTimeout "
        f"({spec.conversion_or_default.lock_timeout}); long transactions of the application "
        "hold it: it is retried",
        reason="LockTimeout",
        retry_seconds=10,
    )


def _drain(
    conn: psycopg.Connection,
    state_schema: str,
    spec: PartitionPolicySpec,
    shape: sqlc.Shape,
    batch: int,
    ms: int,
    deadline: float | None,
) -> bool:
    """Replay the change log until less than a batch is left (the switch replays the rest under its lock).

    False when the time is up first (the application writes faster than one slice replays): the
    next slice goes on, and the switch waits until the log is short.
    """
    target = subject(conn, state_schema, spec)
    while True:
        if deadline is not None and time.monotonic() > deadline:
            return False
        try:
            taken = sqlc.replay_batch(target, shape, batch, ms)
        except RETRYABLE:
            time.sleep(0.2)
            continue
        if taken < batch:
            return True


def _restart_or_block(
    conn: psycopg.Connection, spec: PartitionPolicySpec, state_schema: str, ms: int, what: str
) -> NoReturn:
    """The table changed under the conversion: wait for the user, or build the copy again."""
    schema, table = spec.table.schema_, spec.table.name
    target = subject(conn, state_schema, spec)
    problems = blockers(sqlc.inspect(conn, schema, table), spec)
    if problems:
        # A view or a referencing key would keep pointing at the old table: it waits for the user (the
        # log keeps recording the application's writes meanwhile).
        raise SpecError(
            "conversion",
            f"{spec.table.qualified()} changed during the conversion and cannot be "
            "switched yet: " + "; ".join(problems),
            reason="ConversionBlocked",
        )
    sqlc.abort(target, ms, locked=True)
    raise TransientError(
        f"the {what} of {spec.table.qualified()} changed during the conversion; it starts over",
        reason="ConversionRestarted",
        retry_seconds=1,
    )


def convert(
    conn: psycopg.Connection,
    spec: PartitionPolicySpec,
    state_schema: str,
    now: datetime,
    *,
    budget: float | None = None,
    on_batch: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Report:
    """Advance the conversion as far as `budget` seconds allow (None: to the end)."""
    schema, table = spec.table.schema_, spec.table.name
    target = subject(conn, state_schema, spec)
    deadline = None if budget is None else time.monotonic() + budget
    conv = spec.conversion_or_default
    ms = lock_ms(spec)
    batch = conv.batch_size
    events: list[Event] = []
    # If this process vanishes mid-transaction (a node lost, not a clean kill), the server ends the
    # session within a minute and releases its locks: pgscale never idles inside a transaction.
    conn.execute("SELECT set_config('idle_in_transaction_session_timeout', '60s', false)")
    if not sqlc.try_lock(conn, schema, table):
        report = status(conn, state_schema, spec)
        report.events = [Event("ConversionBusy", "another pgscale run is working on this table")]
        return report
    try:
        state = sqlc.load_state(target)
        partitioned = pg.is_partitioned(conn, schema, table)
        if state is not None and state.phase == "done" and not partitioned:
            sqlc.forget_state(target)  # the table was re-created since
            state = None
        if state is None:
            if partitioned:
                return Report(phase="done", finished=True)
            _build(conn, spec, state_schema, now, deadline)
            faults.checkpoint("after-build")
            state = sqlc.load_state(target)
            assert state is not None
        shape = sqlc.inspect(conn, schema, table) if state.phase in sqlc.BEFORE_SWITCH else None
        if shape is not None and not _same_columns(conn, schema, table, state.shadow):
            _restart_or_block(conn, spec, state_schema, ms, "columns")
        if shape is not None and (missing := sqlc.missing_on_shadow(conn, schema, shape)):
            _restart_or_block(conn, spec, state_schema, ms, f"indexes ({', '.join(missing)})")
        if state.phase == "building":
            assert shape is not None
            fixed = shape
            _with_lock_retries(
                conn,
                state_schema,
                spec,
                "installing the change log",
                lambda: sqlc.install_log(target, fixed, ms),
                deadline,
            )
            events.append(
                Event(
                    "ConversionStarted",
                    f"copying {schema}.{table} into a partitioned table "
                    f"{sqlc.shadow_name(table)}; a trigger logs the application's writes meanwhile",
                )
            )
            faults.checkpoint("after-prepare")
            state.phase = "prepared"
        if state.phase == "prepared":
            assert shape is not None
            conflict = shape.primary_key + ([] if spec.column in shape.primary_key else [spec.column])
            pause = conv.pause_seconds
            cursor = state.cursor
            batches = failures = 0
            while True:
                if (deadline is not None and time.monotonic() > deadline) or (stop and stop()):
                    return _finish(conn, state_schema, spec, events)
                try:
                    read, cursor = sqlc.copy_batch(target, shape, conflict, cursor, batch, ms)
                except RETRYABLE as exc:  # DDL on the table holds it: the batch waits its turn
                    sqlc.note_retry(target)
                    failures += 1
                    if failures > conv.max_retries:
                        raise TransientError(
                            f"copying {spec.table.qualified()} could not read the table within "
                            f"spec.conversion.lockTimeout, {failures} times in a row; it continues later",
                            reason="LockTimeout",
                        ) from exc
                    time.sleep(min(0.2 * failures, 2.0))
                    continue
                failures = 0
                batches += 1
                faults.checkpoint(f"copy-batch-{batches}")
                if on_batch:
                    on_batch(read)
                if read < batch:
                    break
                if pause:
                    time.sleep(pause)
            sqlc.update_state(target, phase="copied")
            faults.checkpoint("after-copy")
            state.phase = "copied"
        if state.phase == "copied":
            assert shape is not None
            if not _drain(conn, state_schema, spec, shape, batch, ms, deadline):
                return _finish(conn, state_schema, spec, events)
            source, copy = sqlc.verify(target, shape)
            if source != copy:
                sqlc.update_state(target, message=f"verification failed: table {source}, copy {copy}")
                raise DependencyError(
                    f"verification of the copy of {spec.table.qualified()} failed ({source[0]} rows in the table, "
                    f"{copy[0]} in the copy, checksums differ: {source[1] != copy[1]}); the table is untouched. "
                    "Delete and re-create the PartitionPolicy to start over, and report this",
                    reason="VerificationFailed",
                )
            sqlc.update_state(target, phase="verified", verified_rows=source[0])
            events.append(
                Event(
                    "ConversionVerified",
                    f"{source[0]} rows in {schema}.{table} and in the partitioned "
                    "copy, with equal checksums (rows written meanwhile are replayed at the switch)",
                )
            )
            faults.checkpoint("after-verify")
            state.phase = "verified"
        if state.phase == "verified":
            assert shape is not None
            problems = blockers(shape, spec)
            if problems:
                raise SpecError(
                    "conversion",
                    f"{spec.table.qualified()} changed during the conversion and cannot "
                    "be switched yet: " + "; ".join(problems),
                    reason="ConversionBlocked",
                )
            if not _drain(conn, state_schema, spec, shape, batch, ms, deadline):
                return _finish(conn, state_schema, spec, events)
            fresh, built_from = shape, state.definition or ""
            drop = conv.drop_referencing_foreign_keys
            try:
                held = _with_lock_retries(
                    conn,
                    state_schema,
                    spec,
                    "the switch",
                    lambda: sqlc.swap(
                        target, fresh, built_from, drop_incoming=drop, lock_timeout_ms=ms, checkpoint=faults.checkpoint
                    ),
                    deadline,
                )
            except sqlc.DefinitionChanged:
                _restart_or_block(conn, spec, state_schema, ms, "definition")
            message = f"{schema}.{table} is now partitioned by {spec.column!r}; the table was locked {held} ms"
            if drop and shape.incoming:
                message += "; dropped foreign keys " + ", ".join(f"{fk.name} on {fk.table}" for fk in shape.incoming)
            events.append(Event("ConversionSwitched", message))
            faults.checkpoint("after-swap")
            state.phase = "swapped"
        if state.phase == "swapped":
            oid = _old_oid(conn, schema, table)
            keep = conv.keep_old_table

            def cleanup() -> int:
                sqlc.cleanup(target, oid, keep_old=keep, lock_timeout_ms=ms)
                return 0

            _with_lock_retries(conn, state_schema, spec, "dropping the old table", cleanup, deadline)
            if not keep:
                events.append(Event("OldTableDropped", f"dropped {sqlc.old_name(table)} (verified copy in place)"))
        return _finish(conn, state_schema, spec, events)
    finally:
        sqlc.unlock(conn, schema, table)


def _finish(conn: psycopg.Connection, state_schema: str, spec: PartitionPolicySpec, events: list[Event]) -> Report:
    report = status(conn, state_schema, spec)
    report.events = events
    return report


def _build(
    conn: psycopg.Connection, spec: PartitionPolicySpec, state_schema: str, now: datetime, deadline: float | None
) -> None:
    """Check what blocks the conversion, then build the partitioned copy (the table is not touched)."""
    schema, table = spec.table.schema_, spec.table.name
    target = subject(conn, state_schema, spec)
    shape = sqlc.inspect(conn, schema, table)
    problems = blockers(shape, spec)
    if problems:
        raise SpecError(
            "conversion",
            f"{spec.table.qualified()} cannot be converted (nothing was changed): " + "; ".join(problems),
            reason="ConversionBlocked",
        )
    column_type = base_type(shape.types[spec.column])
    first, last = sqlc.local_day_range(conn, schema, table, spec.column, column_type, spec.time_zone)
    try:
        ranges = starting_ranges(spec, table, first, last, now)
    except ValueError as exc:
        raise SpecError("namingPattern", str(exc)) from exc
    default_name = f"{table}_default"[:63]
    taken = sqlc.existing_tables(
        conn, schema, [r.name for r in ranges] + [default_name, sqlc.shadow_name(table), sqlc.old_name(table)]
    )
    if taken:
        raise SpecError(
            "namingPattern",
            f"tables named like the new partitions already exist in schema {schema!r}: {', '.join(taken)}; "
            "rename or drop them, or choose another spec.namingPattern",
            reason="NameConflict",
        )
    bounds = [
        sqlc.Bounds(
            r.name,
            sqlp.bound_literal(column_type, r.start, spec.time_zone),
            sqlp.bound_literal(column_type, r.end, spec.time_zone),
        )
        for r in ranges
    ]
    plan = sqlc.ShadowPlan(
        column=spec.column,
        shape=shape,
        partitions=tuple(bounds),
        default_name=default_name,
        widen=spec.conversion_or_default.widen_keys,
        rows_total=sqlc.estimate_rows(conn, schema, table),
        lock_timeout_ms=lock_ms(spec),
    )

    def step() -> int:
        sqlc.build(target, plan)
        return 0

    _with_lock_retries(conn, state_schema, spec, "building the copy", step, deadline)


def _same_columns(conn: psycopg.Connection, schema: str, table: str, shadow: str) -> bool:
    a, b = pg.table_columns(conn, schema, table), pg.table_columns(conn, schema, shadow)
    if a is None or b is None:
        return False
    return [(c.name, c.type) for c in a.values()] == [(c.name, c.type) for c in b.values()]


def _old_oid(conn: psycopg.Connection, schema: str, table: str) -> int:
    """The old table's oid, which the trigger functions are named after."""
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, sqlc.old_name(table)),
    ).fetchone()
    return int(row[0]) if row else 0
