"""PartitionPolicy maintenance of a partitioned table: partitions kept ahead, trimmed behind.

Runs against one connection: a DEFAULT partition when asked for; the current and
`premake` future partitions (rows stranded in DEFAULT get a partition of their own,
moved there before it is attached); retention of partitions past the keep window,
never the current or future ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from . import faults, pg
from .api.partitionpolicy import PartitionInfo, PartitionPolicySpec
from .checks import base_type
from .errors import SpecError
from .partitioning import Range, keep_from, range_for, wanted
from .pg import conversion as sqlc
from .pg import partitions as sqlp
from .pg import relationships
from .pg.relationships import ForeignKey

log = logging.getLogger(__name__)


@dataclass
class Report:
    created: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)  # retention.action export: in a verified file, then dropped
    rows_exported: int = 0
    moved_from_default: int = 0
    skipped: list[str] = field(default_factory=list)  # could not be created now (lock, overlap): next time
    kept: list[str] = field(default_factory=list)  # past the window, but rows of other tables point into them
    busy: bool = False  # another run (the CronJob, a conversion) holds the table: nothing done
    partitions: list[PartitionInfo] = field(default_factory=list)
    count: int = 0  # every attached partition, DEFAULT included (the list above stops at 100)


def _kept(name: str, holders: list[ForeignKey]) -> str:
    return f"{name} (referenced by {', '.join(fk.describe() for fk in holders)})"


Exporter = Callable[[str, str], int]  # (schema, name) of a detached partition -> rows exported, then dropped


def maintain(
    conn: psycopg.Connection, spec: PartitionPolicySpec, now: datetime, *, export: Exporter | None = None
) -> Report:
    """One maintenance pass; one at a time per table, whoever runs it (operator or CronJob).

    ``export``: for retention.action export, takes a detached partition into its file and drops it."""
    schema, table = spec.table.schema_, spec.table.name
    if spec.retention_action == "export" and export is None:
        raise SpecError("retention.export", "action export needs its destination; nothing was detached")
    if not sqlc.try_lock(conn, schema, table):
        return Report(busy=True)
    try:
        return _maintain(conn, spec, now, export)
    finally:
        sqlc.unlock(conn, schema, table)


def _maintain(conn: psycopg.Connection, spec: PartitionPolicySpec, now: datetime, export: Exporter | None) -> Report:
    report = Report()

    def retired(part_schema: str, name: str, action: str) -> None:
        if action == "export":
            assert export is not None
            report.rows_exported += export(part_schema, name)
            report.exported.append(name)
        else:
            (report.dropped if action == "drop" else report.detached).append(name)

    schema, table = spec.table.schema_, spec.table.name
    columns = pg.table_columns(conn, schema, table) or {}
    column_type = base_type(columns[spec.column].type)
    key = sqlp.range_key(conn, schema, table)
    if key != [spec.column]:
        how = f"by {', '.join(key)}" if key else "by LIST or HASH, or by an expression"
        raise SpecError(
            "column",
            f"{spec.table.qualified()} is already partitioned {how}, not by RANGE on {spec.column!r}; "
            "pgscale maintains range partitions on the policy's column only",
            reason="PartitionKeyMismatch",
        )
    lock_ms = spec.conversion_or_default.lock_timeout_ms
    existing = sqlp.parts(conn, schema, table)
    default = next((p for p in existing if p.is_default), None)
    if spec.default_partition == "create" and default is None:
        try:
            report.created.append(sqlp.create_default(conn, schema, table, lock_ms))
        except psycopg.errors.LockNotAvailable:
            report.skipped.append(f"{table}_default")
        existing = sqlp.parts(conn, schema, table)
        default = next((p for p in existing if p.is_default), None)
    try:
        targets: dict[str, Range] = {
            r.name: r for r in wanted(spec.interval, spec.time_zone, now, spec.premake, spec.naming_pattern, table)
        }
        if default is not None:
            for day in sqlp.default_days(conn, default, spec.column, column_type, spec.time_zone):
                r = range_for(spec.interval, day, spec.naming_pattern, table)
                targets.setdefault(r.name, r)
    except ValueError as exc:
        raise SpecError("namingPattern", str(exc)) from exc
    names = {p.name for p in existing}
    # A partition made by hand or by another tool under another name counts when its bounds match.
    covered = sqlp.bound_values(conn, [b for p in existing if (b := sqlp.bounds_of(conn, p, column_type))], column_type)
    for name, r in sorted(targets.items(), key=lambda kv: kv[1].start):
        lower = sqlp.bound_literal(column_type, r.start, spec.time_zone)
        upper = sqlp.bound_literal(column_type, r.end, spec.time_zone)
        if name in names or sqlp.literal_values(conn, lower, upper, column_type) in covered:
            continue
        try:
            report.moved_from_default += sqlp.create(
                conn, schema, table, spec.column, name, lower, upper, list(columns), default, lock_ms
            )
            report.created.append(name)
        except (psycopg.errors.LockNotAvailable, psycopg.errors.InvalidObjectDefinition) as exc:
            # A lock the application holds, or a range a hand-made partition already covers.
            log.info("partition %s not created now: %s", name, str(exc).strip())
            report.skipped.append(name)
    if spec.default_partition == "none" and default is not None:
        # A conversion always starts with one (writes outside every range must not fail meanwhile);
        # once its rows have partitions of their own, it goes, as the spec asks.
        try:
            if sqlp.drop_if_empty(conn, default, schema, table, lock_ms):
                report.dropped.append(default.name)
        except psycopg.errors.LockNotAvailable:
            report.skipped.append(default.name)
    action = spec.retention_action
    archive = spec.retention.archive_schema if spec.retention else None
    for leftover_schema, leftover in sqlp.retired_leftovers(conn, schema, table):
        # Detached earlier, but its drop or move did not happen: finish it first.
        try:
            sqlp.finish_retire(conn, leftover_schema, leftover, action=action, archive_schema=archive)
        except psycopg.errors.LockNotAvailable:
            report.skipped.append(leftover)
            continue
        retired(leftover_schema, leftover, action)
    for part in sqlp.pending_detaches(conn, schema, table):
        # A concurrent detach that gave way earlier: finish it first (it blocks every other detach).
        try:
            sqlp.retire(
                conn,
                schema,
                table,
                part,
                action=action,
                archive_schema=archive,
                concurrently=False,
                lock_timeout_ms=lock_ms,
                finalize=True,
            )
        except psycopg.errors.LockNotAvailable:
            report.skipped.append(part.name)
            continue
        retired(part.schema, part.name, action)
    if spec.retention:
        cutoff = keep_from(spec.retention.keep, spec.time_zone, now, spec.interval)
        cutoff_literal = sqlp.bound_literal(column_type, cutoff, spec.time_zone)
        current = sqlp.parts(conn, schema, table)
        concurrent = (
            spec.retention.concurrently
            and pg.server_version(conn)[1] >= 140000
            and not any(p.is_default for p in current)
        )
        references = relationships.references(conn, schema, table)
        for part in current:
            bounds = sqlp.bounds_of(conn, part, column_type)
            if bounds is None or not sqlp.ends_by(conn, bounds[1], cutoff_literal, column_type):
                continue
            # A partition that rows of another table point into is never detached or dropped with
            # them pointing into it (a drop would take their parents, a detach is refused): kept.
            holders = [fk for fk in references if sqlp.referenced_rows(conn, part, fk)]
            if holders:
                report.kept.append(_kept(part.name, holders))
                continue
            try:
                sqlp.retire(
                    conn,
                    schema,
                    table,
                    part,
                    action=spec.retention.action,
                    archive_schema=spec.retention.archive_schema,
                    concurrently=concurrent and not references,
                    lock_timeout_ms=lock_ms,
                )
            except psycopg.errors.ForeignKeyViolation:
                # A referencing row arrived after the check: PostgreSQL refused the detach; nothing changed.
                report.kept.append(_kept(part.name, references))
                continue
            except (psycopg.errors.LockNotAvailable, psycopg.errors.ObjectNotInPrerequisiteState):
                # A concurrent detach that gave way stays pending, and no other detach of this table can
                # start until it is finalized: stop here; the next maintenance finishes it first.
                report.skipped.append(part.name)
                break
            faults.checkpoint("partition-detached")
            retired(part.schema, part.name, spec.retention.action)
    attached = sqlp.parts(conn, schema, table)
    report.count = len(attached)
    for part in attached[:100]:  # status lists at most 100; partitionCount counts them all
        entry = PartitionInfo(
            name=part.name, is_default=part.is_default, rows_estimate=part.rows_estimate, bytes=part.bytes
        )
        bounds = sqlp.bounds_of(conn, part, column_type)
        if bounds:
            entry.from_, entry.to = bounds
        report.partitions.append(entry)
    return report
