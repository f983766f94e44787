"""PartitionPolicy controller: check the table, keep the maintenance CronJob."""

from __future__ import annotations

from typing import Any

from .. import builders, pg
from .. import conditions as cond
from ..api import PARTITION_POLICY, RETENTION_POLICY
from ..api.partitionpolicy import PartitionPolicySpec
from ..checks import TIME_TYPES, require_column, require_table
from ..durations import seconds
from ..errors import SpecError
from ..kube import ObjectRef
from ..schedule import zone
from .base import CONFLICT, Context, Result, StatusWriter, profile_connection, same_table


class PartitionPolicyController:
    """Validates the table and partition column against the database."""

    kind = PARTITION_POLICY

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: PartitionPolicySpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        info = profile_connection(ctx, ref.namespace, spec.profile_ref.name)
        with pg.connect(info) as conn:
            columns = require_table(conn, spec.table)
            require_column(columns, spec.column, "column", spec.table, TIME_TYPES, "timestamp, timestamptz or date")
            partitioned = pg.is_partitioned(conn, spec.table.schema_, spec.table.name)
        status.update(partitioned=partitioned)
        zone(spec.time_zone)
        maintenance = spec.maintenance
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
        state = "partitioned" if partitioned else "not partitioned yet"
        interval = seconds(maintenance.interval) if maintenance else 3600.0
        return Result(
            "Validated",
            f"{spec.table.qualified()} ({state}) partitioned {spec.interval} by {spec.column!r}",
            requeue_after=interval,
        )
