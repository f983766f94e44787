"""RetentionPolicy controller: check the table, keep the archive and the CronJob, report runs.

The runs themselves are `pgscale job retention` (jobs/retention.py), started by the
CronJob; they record themselves in the run log, which this controller mirrors into
status (last run, progress, totals) and conditions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg

from .. import conditions as cond
from .. import pg
from ..api import RETENTION_POLICY
from ..api.databaseprofile import DatabaseProfileSpec
from ..api.retentionpolicy import ExportStatus, RelationshipStatus, RetentionPolicySpec, RunStatus, TotalsStatus
from ..api.retentionpolicy import RetentionPolicyStatus as Status
from ..durations import seconds
from ..errors import DependencyError, SpecError
from ..events import Event
from ..kube import ObjectRef
from ..metrics import METRICS
from ..pg import export as sqle
from ..pg import retention as sqlr
from ..pg.connection import ConnInfo
from ..progress import eta
from ..retention import Prepared, Stake, at_stake, prepare, row_lock_wait, unresolved_error
from ..schedule import next_run
from ..schedule import rfc3339 as _ts
from ..specs import builders
from .base import (
    CONFLICT,
    Context,
    Result,
    StatusWriter,
    check_destination,
    ensure_finalizer,
    has_finalizer,
    load_profile,
    partition_owner,
)

LAST_RUN = "LastRunSucceeded"
RUNNING_POLL_SECONDS = 10.0


def run_status(last: sqlr.RunRow, now: datetime) -> RunStatus:
    """A run-log row as status.lastRun (pure)."""
    end = last["ended_at"]
    elapsed = ((end or now) - last["started_at"]).total_seconds()
    done = int(last["rows_archived"]) + int(last["rows_deleted"])
    rate = done / elapsed if elapsed > 0 else 0.0
    status = RunStatus(
        start_time=_ts(last["started_at"]),
        end_time=_ts(end),
        rows_archived=int(last["rows_archived"]),
        rows_deleted=int(last["rows_deleted"]),
        batches=int(last["batches"]),
        duration_seconds=round(elapsed, 3),
        outcome="DryRun" if last["dry_run"] and last["outcome"] not in ("Failed", "Running") else last["outcome"],
        message=(last["message"] or "")[:4096],
        rows_per_second=round(rate, 1),
    )
    tables = last["tables"]
    if tables:
        status.tables = {str(k): int(v) for k, v in list(tables.items())[:256]}
    if last["rows_matched"] is not None:
        status.rows_matched = int(last["rows_matched"])
    if last["rows_total"] is not None:
        status.rows_total = int(last["rows_total"])
        if last["outcome"] == "Running":
            status.eta_seconds = eta(done, int(last["rows_total"]), rate)
    return status


def relationships_status(prepared: Prepared, stake: Stake) -> list[RelationshipStatus]:
    """status.relationships: every foreign key that reaches the rows runs remove (pure)."""
    out = []
    for item in prepared.relationships.listed[:100]:
        fk = item.fk
        entry = RelationshipStatus(
            table=f"{fk.schema}.{fk.table}",
            constraint=fk.name,
            references=f"{fk.ref_schema}.{fk.ref_table}",
            on_delete=fk.action,
            mode=item.mode or "unset",
            effect=item.effect,
        )
        if stake.get(fk) is not None:
            entry.rows = stake[fk]
        out.append(entry)
    return out


def export_status(totals: sqle.Totals, location: str | None = None) -> ExportStatus:
    """status.export from the ledger's totals (pure); ``location``: the destination, when exporting."""
    return ExportStatus(
        files=totals.files,
        rows=totals.rows,
        bytes=totals.bytes,
        database_bytes_freed=totals.row_bytes,
        oldest=_ts(totals.oldest) if totals.oldest else None,
        newest=_ts(totals.newest) if totals.newest else None,
        restored_files=totals.restored,
        location=(location or totals.location or "")[:1024] or None,
    )


def cron_job_name(ref: ObjectRef) -> str:
    """The pg_cron job's name (unique per policy)."""
    return f"pgscale-retention:{ref.namespace}/{ref.name}"


class RetentionPolicyController:
    """Validates the policy, keeps its archive table and schedule, reports its runs."""

    kind = RETENTION_POLICY

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: RetentionPolicySpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        if spec.scheduler == "pg_cron" and spec.time_zone != "UTC":
            raise SpecError("timeZone", "pg_cron runs schedules in GMT: set timeZone: UTC, or use scheduler: cronjob")
        due = next_run(spec.schedule, spec.time_zone)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        owner = partition_owner(ctx, ref.namespace, obj["spec"]) if spec.partition_aware else None
        events: list[Event] = []
        location = None
        if spec.action == "export":  # before any run: a bucket that cannot take files stalls the policy
            if spec.scheduler == "pg_cron":
                raise SpecError(
                    "scheduler",
                    "action export writes files from the job's pod; pg_cron runs in the database, which cannot: "
                    "use scheduler: cronjob",
                )
            location = check_destination(ctx, ref.namespace, spec.export_or_default.destination, "export.destination")
        with pg.pooled(info) as conn:  # one of a few sessions per database, not one per reconcile
            prepared = prepare(conn, spec, profile.state_schema)
            target = prepared.target
            running = sqlr.run_lock_held(conn, f"{ref.namespace}/{ref.name}")
            if prepared.relationships.unresolved or not (running and status.read(Status).relationships):
                # Counting reads the tables: not while a run moves their rows (the last counts stay).
                stake = at_stake(conn, prepared, sqlr.cutoff_for(conn, target.age_interval))
                status.update(Status(relationships=relationships_status(prepared, stake) or None))
                if prepared.relationships.unresolved:
                    raise unresolved_error(prepared, stake)
            for name in prepared.created:
                events.append(Event("ArchiveTableCreated", f"created archive table {name}"))
            sqlr.mark_interrupted(conn, profile.state_schema, f"{ref.namespace}/{ref.name}")
            runs = sqlr.summary(conn, profile.state_schema, f"{ref.namespace}/{ref.name}")
            exported = sqle.totals(conn, profile.state_schema, f"{ref.namespace}/{ref.name}")
            if spec.action == "export" or exported.files:
                status.update(Status(export=export_status(exported, location)))
                METRICS.export(f"{ref.namespace}/{ref.name}", exported)
            if spec.scheduler == "pg_cron":
                ensure_finalizer(ctx, self.kind, obj, needed=True)  # the job lives outside the cluster
                job_id = self._schedule_pg_cron(conn, info, ref, spec, target, profile.state_schema)
                ctx.kube.delete("batch/v1", "CronJob", ref.namespace, builders.job_name(ref, "retention"))
                where = f"pg_cron job {job_id}" if job_id else "pg_cron (unscheduled)"
                status.update(Status(pg_cron_job_id=job_id, cron_job_name=None))
            else:
                if has_finalizer(obj):  # switched away from pg_cron
                    self.finalize(ctx, obj, spec)
                    ensure_finalizer(ctx, self.kind, obj, needed=False)
                name = self._apply_cron_job(ctx, obj, ref, spec, profile, bool(owner))
                status.update(Status(cron_job_name=name, pg_cron_job_id=None))
                where = f"CronJob {name}"
        status.conditions = cond.flag(
            status.conditions,
            CONFLICT,
            bool(owner),
            "PartitionsOwnedElsewhere",
            f"PartitionPolicy {owner!r} manages retention of the partitions of {spec.table.qualified()}; "
            "this policy archives row by row only. Remove one of the two retention settings",
            status.generation,
        )
        next_time = None if spec.suspend else _ts(due)
        status.update(Status(next_run_time=next_time))
        running = self._report_runs(runs, status, events)
        verb = "suspended" if spec.suspend else f"next run {next_time}"
        message = f"{where} runs {spec.schedule!r} ({spec.time_zone}); {verb}"
        if running:
            last_run = status.read(Status).last_run
            assert last_run is not None
            so_far = last_run.rows_archived + last_run.rows_deleted
            message = f"run in progress: {so_far} rows so far; {message}"
        return Result("Scheduled", message, requeue_after=RUNNING_POLL_SECONDS if running else None, events=events)

    def _apply_cron_job(
        self,
        ctx: Context,
        obj: dict[str, Any],
        ref: ObjectRef,
        spec: RetentionPolicySpec,
        profile: DatabaseProfileSpec,
        owned_elsewhere: bool,
    ) -> str:
        extra, volumes = builders.destination_env(spec.export.destination if spec.export else None)
        cron = builders.cron_job(
            ref,
            suffix="retention",
            schedule=spec.schedule,
            time_zone=spec.time_zone,
            suspend=spec.suspend,
            args=builders.job_args("retention", ref),
            template=spec.job,
            default_image=ctx.config.image,
            active_deadline_seconds=int(seconds(spec.max_run_time)) + 300,
            env=builders.job_env(ref, obj["spec"], profile, {"partitionsOwnedElsewhere": owned_elsewhere}) + extra,
            volumes=volumes,
        )
        ctx.kube.apply(cron)
        return str(cron["metadata"]["name"])

    def _schedule_pg_cron(
        self,
        conn: psycopg.Connection,
        info: ConnInfo,
        ref: ObjectRef,
        spec: RetentionPolicySpec,
        target: sqlr.Target,
        state_schema: str,
    ) -> int:
        """Install the procedure and this policy's rendered statements; schedule (or unschedule) the call."""
        cron_db = sqlr.cron_database(conn)
        if cron_db is None:
            raise DependencyError(
                "pg_cron is not loaded on this server (shared_preload_libraries); install it, or use "
                "spec.scheduler: cronjob",
                reason="PgCronNotAvailable",
            )
        policy = f"{ref.namespace}/{ref.name}"
        sqlr.ensure_procedure(conn, state_schema)
        sqlr.save_config(
            conn,
            state_schema,
            policy,
            target,
            dry_run=spec.dry_run,
            lock_timeout=f"{int(seconds(spec.lock_timeout) * 1000)}ms",
            row_lock_wait=f"{max(1, round(row_lock_wait(seconds(spec.lock_timeout)) * 1000))}ms",
            statement_timeout=f"{int(seconds(spec.statement_timeout) * 1000)}ms",
            max_run=f"{int(seconds(spec.max_run_time))} seconds",
            pause=seconds(spec.pause_between_batches),
        )
        with pg.connect(info.with_database(cron_db)) as cron:
            if not sqlr.has_extension(cron, "pg_cron"):
                raise DependencyError(
                    f"pg_cron is loaded but not created in database {cron_db!r}: run CREATE EXTENSION pg_cron "
                    "there, or use spec.scheduler: cronjob",
                    reason="PgCronNotAvailable",
                )
            if spec.suspend:
                sqlr.cron_unschedule(cron, cron_job_name(ref))
                return 0
            command = sqlr.cron_command(state_schema, policy).as_string(conn)
            try:
                return sqlr.cron_schedule(cron, cron_job_name(ref), spec.schedule, command, info.dbname)
            except psycopg.errors.InvalidParameterValue as exc:  # pg_cron reads fewer forms than croniter
                raise SpecError(
                    "schedule",
                    f"pg_cron does not accept the schedule {spec.schedule!r} ({str(exc).strip()}); use plain cron "
                    "fields (numbers, ranges, lists, steps, *), or scheduler: cronjob",
                ) from exc

    def finalize(self, ctx: Context, obj: dict[str, Any], spec: RetentionPolicySpec) -> None:
        """Remove the pg_cron job (the only thing this kind keeps outside the cluster)."""
        ref = ObjectRef.of(obj)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        with pg.connect(info) as conn:
            cron_db = sqlr.cron_database(conn)
            sqlr.delete_config(conn, profile.state_schema, f"{ref.namespace}/{ref.name}")
        if cron_db is None:
            return
        with pg.connect(info.with_database(cron_db)) as cron:
            if sqlr.has_extension(cron, "pg_cron") and sqlr.cron_unschedule(cron, cron_job_name(ref)):
                ctx.kube.event(ref, "Unscheduled", f"removed pg_cron job {cron_job_name(ref)}")

    @staticmethod
    def _report_runs(runs: sqlr.RunSummary, status: StatusWriter, events: list[Event]) -> bool:
        """Mirror the run log into status, conditions and one Event per finished run; True while running."""
        if runs.last is None:
            return False
        last = run_status(runs.last, datetime.now(UTC))
        seen = status.read(Status).last_run or RunStatus()
        totals = TotalsStatus(runs=runs.runs, rows_archived=runs.rows_archived, rows_deleted=runs.rows_deleted)
        status.update(Status(last_run=last, totals=totals))
        if last.outcome == "Running":
            return True
        ok = last.outcome in ("Succeeded", "Partial", "DryRun")
        status.conditions = cond.set_condition(
            status.conditions,
            LAST_RUN,
            "True" if ok else "False",
            f"Run{last.outcome}",
            last.message or str(last.outcome),
            status.generation,
        )
        if (seen.start_time, seen.outcome) != (last.start_time, last.outcome):
            events.append(Event(f"Run{last.outcome}", last.message or str(last.outcome), warning=not ok))  # one per run
        return False
