"""RetentionPolicy controller: check the table, keep the archive and the CronJob, report runs.

The runs themselves are `pgscale job retention` (jobs/retention.py), started by the
CronJob; they record themselves in the run log, which this controller mirrors into
status (last run, progress, totals) and conditions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .. import builders, pg
from .. import conditions as cond
from ..api import RETENTION_POLICY
from ..api.retentionpolicy import RetentionPolicySpec
from ..durations import seconds
from ..errors import SpecError
from ..jobs.retention import prepare
from ..kube import ObjectRef
from ..pg import retention as sqlr
from ..progress import eta
from ..schedule import next_run
from ..schedule import rfc3339 as _ts
from .base import CONFLICT, Context, Result, StatusWriter, load_profile, partition_owner

LAST_RUN = "LastRunSucceeded"
RUNNING_POLL_SECONDS = 10.0


def run_status(last: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A run-log row as status.lastRun (pure)."""
    end = last["ended_at"]
    elapsed = ((end or now) - last["started_at"]).total_seconds()
    done = int(last["rows_archived"]) + int(last["rows_deleted"])
    rate = done / elapsed if elapsed > 0 else 0.0
    status: dict[str, Any] = {
        "startTime": _ts(last["started_at"]),
        "endTime": _ts(end),
        "rowsArchived": int(last["rows_archived"]),
        "rowsDeleted": int(last["rows_deleted"]),
        "batches": int(last["batches"]),
        "durationSeconds": round(elapsed, 3),
        "outcome": "DryRun" if last["dry_run"] and last["outcome"] != "Failed" else last["outcome"],
        "message": (last["message"] or "")[:4096],
        "rowsPerSecond": round(rate, 1),
    }
    if last["rows_matched"] is not None:
        status["rowsMatched"] = int(last["rows_matched"])
    if last["rows_total"] is not None:
        status["rowsTotal"] = int(last["rows_total"])
        if last["outcome"] == "Running":
            status["etaSeconds"] = eta(done, int(last["rows_total"]), rate)
    return status


class RetentionPolicyController:
    """Validates the policy, keeps its archive table and CronJob, reports its runs."""

    kind = RETENTION_POLICY

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: RetentionPolicySpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        due = next_run(spec.schedule, spec.time_zone)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        events: list[tuple[str, str, bool]] = []
        with pg.connect(info) as conn:
            target, created = prepare(conn, spec, profile.state_schema)
            if created:
                events.append(
                    (
                        "ArchiveTableCreated",
                        f"created archive table {target.archive_schema}.{target.archive_table}",
                        False,
                    )
                )
            runs = sqlr.summary(conn, profile.state_schema, f"{ref.namespace}/{ref.name}")
        if spec.scheduler == "pg_cron":
            # Never leave a CronJob running for a policy that asks for another scheduler.
            ctx.kube.delete("batch/v1", "CronJob", ref.namespace, builders.job_name(ref, "retention"))
            raise SpecError(
                "scheduler",
                "pg_cron scheduling is not available in this pgscale version; use scheduler: cronjob",
                reason="Unsupported",
            )
        owner = partition_owner(ctx, ref.namespace, obj["spec"]) if spec.partition_aware else None
        if owner:
            status.conditions = cond.set_condition(
                status.conditions, CONFLICT, "True", "PartitionsOwnedElsewhere",
                f"PartitionPolicy {owner!r} manages retention of the partitions of {spec.table.qualified()}; "
                "this policy archives row by row only. Remove one of the two retention settings",
                status.generation,
            )  # fmt: skip
        else:
            status.conditions = cond.remove(status.conditions, CONFLICT)
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
            env=builders.job_env(ref, obj["spec"], profile, {"partitionsOwnedElsewhere": bool(owner)}),
        )
        ctx.kube.apply(cron)
        name = cron["metadata"]["name"]
        next_time = None if spec.suspend else _ts(due)
        status.update(cronJobName=name, nextRunTime=next_time)
        running = False
        if runs.last is not None:
            last = run_status(runs.last, datetime.now(UTC))
            running = last["outcome"] == "Running"
            seen = status.status.get("lastRun") or {}
            status.update(
                lastRun=last,
                totals={"runs": runs.runs, "rowsArchived": runs.rows_archived, "rowsDeleted": runs.rows_deleted},
            )
            if not running:
                ok = last["outcome"] in ("Succeeded", "Partial", "DryRun")
                status.conditions = cond.set_condition(
                    status.conditions, LAST_RUN, "True" if ok else "False",
                    f"Run{last['outcome']}", last["message"] or last["outcome"], status.generation,
                )  # fmt: skip
                if (seen.get("startTime"), seen.get("outcome")) != (last["startTime"], last["outcome"]):
                    events.append((f"Run{last['outcome']}", last["message"] or last["outcome"], not ok))  # one per run
        verb = "suspended" if spec.suspend else f"next run {next_time}"
        message = f"CronJob {name} runs {spec.schedule!r} ({spec.time_zone}); {verb}"
        if running:
            so_far = status.status["lastRun"]["rowsArchived"] + status.status["lastRun"]["rowsDeleted"]
            message = f"run in progress: {so_far} rows so far; {message}"
        return Result("Scheduled", message, requeue_after=RUNNING_POLL_SECONDS if running else None, events=events)
