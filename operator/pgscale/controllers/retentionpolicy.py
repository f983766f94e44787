"""RetentionPolicy controller: check the table and columns, keep the CronJob."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .. import builders, pg
from ..api import RETENTION_POLICY
from ..api.retentionpolicy import RetentionPolicySpec
from ..durations import seconds
from ..errors import SpecError
from ..kube import ObjectRef
from .base import Context, Result, StatusWriter, profile_connection
from .checks import TIME_TYPES, require_column, require_table


def next_run(schedule: str, time_zone: str, now: datetime | None = None) -> datetime:
    """When a cron schedule fires next, in UTC; SpecError names the bad field."""
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise SpecError("timeZone", f"unknown time zone {time_zone!r}: use an IANA name like Europe/Berlin") from exc
    if not croniter.is_valid(schedule):
        raise SpecError("schedule", f"{schedule!r} is not a valid cron expression (minute hour day month weekday)")
    start = (now or datetime.now(UTC)).astimezone(zone)
    return croniter(schedule, start).get_next(datetime).astimezone(UTC)  # type: ignore[no-any-return]


class RetentionPolicyController:
    """Validates the policy against the database and schedules its runs."""

    kind = RETENTION_POLICY

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: RetentionPolicySpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        due = next_run(spec.schedule, spec.time_zone)
        info = profile_connection(ctx, ref.namespace, spec.profile_ref.name)
        with pg.connect(info) as conn:
            columns = require_table(conn, spec.table)
            require_column(
                columns, spec.age_column, "ageColumn", spec.table, TIME_TYPES, "timestamp, timestamptz or date"
            )
            for i, row_filter in enumerate(spec.filters):
                require_column(columns, row_filter.column, f"filters[{i}].column", spec.table)
        if spec.scheduler == "pg_cron":
            raise SpecError(
                "scheduler",
                "pg_cron scheduling is not available in this pgscale version; use scheduler: cronjob",
                reason="Unsupported",
            )
        cron = builders.cron_job(
            ref,
            suffix="retention",
            schedule=spec.schedule,
            time_zone=spec.time_zone,
            suspend=spec.suspend,
            args=builders.job_args("retention", ref),
            template=spec.job,
            default_image=ctx.settings.image,
            active_deadline_seconds=int(seconds(spec.max_run_time)) + 300,
        )
        ctx.kube.apply(cron)
        name = cron["metadata"]["name"]
        next_time = None if spec.suspend else due.strftime("%Y-%m-%dT%H:%M:%SZ")
        status.update(cronJobName=name, nextRunTime=next_time)
        verb = "suspended" if spec.suspend else f"next run {next_time}"
        return Result("Scheduled", f"CronJob {name} runs {spec.schedule!r} ({spec.time_zone}); {verb}")
