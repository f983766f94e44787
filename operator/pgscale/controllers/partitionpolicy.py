"""PartitionPolicy controller: check the table, keep the maintenance CronJob."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .. import builders, pg
from .. import conditions as cond
from ..api import PARTITION_POLICY, RETENTION_POLICY
from ..api.partitionpolicy import PartitionPolicySpec
from ..checks import TIME_TYPES, require_column, require_table
from ..conditions import now_rfc3339
from ..durations import seconds
from ..errors import SpecError
from ..kube import ObjectRef
from ..maintenance import maintain
from ..schedule import rfc3339, zone
from .base import CONFLICT, Context, Result, StatusWriter, profile_connection, same_table


class PartitionPolicyController:
    """Validates the table and partition column against the database."""

    kind = PARTITION_POLICY

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: PartitionPolicySpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        zone(spec.time_zone)
        info = profile_connection(ctx, ref.namespace, spec.profile_ref.name)
        events: list[tuple[str, str, bool]] = []
        report = None
        with pg.connect(info) as conn:
            columns = require_table(conn, spec.table)
            require_column(columns, spec.column, "column", spec.table, TIME_TYPES, "timestamp, timestamptz or date")
            partitioned = pg.is_partitioned(conn, spec.table.schema_, spec.table.name)
            if partitioned and not spec.suspend:
                report = maintain(conn, spec, datetime.now(UTC))
        status.update(partitioned=partitioned)
        maintenance = spec.maintenance
        interval = seconds(maintenance.interval) if maintenance else 3600.0
        if report is not None:
            now = now_rfc3339()
            status.update(
                partitions=report.partitions,
                partitionCount=len(report.partitions),
                lastMaintenance={"time": now, "created": report.created, "detached": report.detached,
                                 "dropped": report.dropped, "rowsMovedFromDefault": report.moved_from_default},
                nextMaintenanceTime=rfc3339(datetime.now(UTC) + timedelta(seconds=interval)),
            )  # fmt: skip
            for verb, names in (("Created", report.created), ("Detached", report.detached),
                                ("Dropped", report.dropped)):  # fmt: skip
                if names:
                    events.append((f"Partitions{verb}", ", ".join(names), False))
            if report.moved_from_default:
                events.append(("RowsMovedFromDefault", f"{report.moved_from_default} rows moved out of the "
                               "DEFAULT partition into their partitions", False))  # fmt: skip
        if maintenance and maintenance.cron_job:
            ctx.kube.delete("batch/v1", "CronJob", ref.namespace, builders.job_name(ref, "partition-maintenance"))
            raise SpecError(
                "maintenance.cronJob",
                "running maintenance from a CronJob is not available in this pgscale version; "
                "set maintenance.cronJob: false",
                reason="Unsupported",
            )
        claimants = [
            o["metadata"]["name"]
            for o in ctx.kube.list_resources(RETENTION_POLICY, ref.namespace)
            if same_table(o.get("spec") or {}, obj["spec"]) and (o.get("spec") or {}).get("partitionAware", True)
        ]
        status.conditions = cond.flag(
            status.conditions, CONFLICT, bool(spec.retention and claimants), "RetentionPolicyOnSameTable",
            f"RetentionPolicy {', '.join(claimants)} also trims {spec.table.qualified()}; this policy owns "
            "its partitions and the RetentionPolicy works row by row only",
            status.generation,
        )  # fmt: skip
        if report is None:
            state = "suspended" if partitioned else "not partitioned yet: converting a table is not available yet"
            return Result("Validated", f"{spec.table.qualified()} ({state})", requeue_after=interval)
        message = f"{spec.table.qualified()}: {len(report.partitions)} partitions, {spec.interval} by {spec.column!r}"
        if report.skipped:
            message += f"; retried next time: {', '.join(report.skipped)}"
        return Result("Maintained", message, requeue_after=interval, events=events)
