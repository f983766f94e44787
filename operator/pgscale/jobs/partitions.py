"""`pgscale job partition-maintenance`: convert the table if needed, then keep its partitions.

Run from the PartitionPolicy's CronJob (``maintenance.cronJob``) or by hand. A
conversion runs to the end here, with a progress line; killed at any point, the next
run (or the operator) continues from the step it reached. Maintenance is idempotent,
so the operator's own runs and this job may alternate freely; one at a time works on
a table (advisory lock).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import pg
from ..api import PARTITION_POLICY
from ..api.partitionpolicy import PartitionPolicySpec
from ..checks import TIME_TYPES, require_column, require_table
from ..conversion import convert
from ..errors import ReconcileError
from ..export import partition_exporter, partition_policy_key
from ..maintenance import maintain
from ..pg import conversion as sqlc
from ..progress import Progress
from ..storage import open_store
from . import JobInput, start


@dataclass
class RunReport:
    """What one run did (printed as JSON)."""

    outcome: str
    conversion: dict[str, Any] | None = None
    created: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)
    rows_exported: int = 0
    rows_moved_from_default: int = 0
    partitions: int = 0
    message: str = ""


def run(
    job: JobInput, *, stop: threading.Event | None = None, progress: Progress | None = None, dry_run: bool = False
) -> RunReport:
    spec = PartitionPolicySpec.model_validate(job.spec)
    stop = stop or threading.Event()
    schema, table = spec.table.schema_, spec.table.name
    with pg.connect(job.conn) as conn:
        conn.execute("SELECT set_config('application_name', %s, false)", (f"pgscale-partitions {job.policy_key}"[:63],))
        columns = require_table(conn, spec.table, owner=True)
        require_column(columns, spec.column, "column", spec.table, TIME_TYPES, "timestamp, timestamptz or date")
        report = RunReport("Succeeded")
        state = sqlc.load_state(sqlc.Subject(conn, job.state_schema, schema, table))
        converting = not pg.is_partitioned(conn, schema, table) or (state is not None and state.phase in sqlc.IN_FLIGHT)
        if converting:
            if dry_run or not spec.conversion_or_default.enabled:
                report.outcome = "NotPartitioned"
                report.message = f"{schema}.{table} is not partitioned; conversion " + (
                    "not run (dry run)" if dry_run else "disabled in spec.conversion.enabled"
                )
                return report
            if progress:
                progress.start(sqlc.estimate_rows(conn, schema, table))
            result = convert(
                conn,
                spec,
                job.state_schema,
                datetime.now(UTC),
                on_batch=progress.advance if progress else None,
                stop=stop.is_set,
            )
            report.conversion = {k: v for k, v in asdict(result).items() if k not in ("events", "started_at")}
            if not result.finished:
                report.outcome = "Partial"
                report.message = f"conversion stopped in phase {result.phase}; the next run continues"
                return report
        if dry_run:
            report.message = f"{schema}.{table} is partitioned; dry run changes nothing"
            return report
        export = None
        if spec.retention is not None and spec.retention.export is not None:
            destination = spec.retention.export.destination
            export = partition_exporter(
                conn,
                open_store(destination),
                state_schema=job.state_schema,
                policy=partition_policy_key(job.namespace, job.name),
                source=(schema, table),
                age_column=spec.column,
                destination=destination.wire(),
            )
        done = maintain(conn, spec, datetime.now(UTC), export=export)
        report.created, report.detached, report.dropped = done.created, done.detached, done.dropped
        report.exported, report.rows_exported = done.exported, done.rows_exported
        report.rows_moved_from_default = done.moved_from_default
        report.partitions = done.count
        report.message = f"{schema}.{table}: {report.partitions} partitions"
    return report


def main(args: argparse.Namespace) -> int:
    """Entry point of `pgscale job partition-maintenance`."""
    started = start(PARTITION_POLICY, "partition-maintenance", args.namespace, args.name)
    if started is None:
        return 2
    job, stop = started
    progress = Progress("conversion", stream=sys.stderr, unit="rows")
    try:
        report = run(job, stop=stop, progress=progress, dry_run=bool(args.dry_run))
    except ReconcileError as exc:
        print(f"pgscale job partition-maintenance: {exc.message}", file=sys.stderr)
        return 1
    if report.conversion:
        progress.finish(report.outcome)
    print(json.dumps(asdict(report), default=str))
    return 0
