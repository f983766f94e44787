"""PartitionPolicy controller: convert the table (in slices), keep its partitions, keep the CronJob."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .. import conditions as cond
from .. import pg
from ..api import PARTITION_POLICY, RETENTION_POLICY
from ..api.common import default_of
from ..api.databaseprofile import DatabaseProfileSpec
from ..api.partitionpolicy import MaintenanceRun, PartitionPolicySpec, ProgressStatus
from ..api.partitionpolicy import PartitionPolicyStatus as Status
from ..api.retentionpolicy import RetentionPolicySpec
from ..checks import TIME_TYPES, require_column, require_table
from ..conditions import now_rfc3339
from ..conversion import Report as Conversion
from ..conversion import convert, lock_ms
from ..conversion import status as conversion_status
from ..conversion import subject as conversion_subject
from ..errors import SpecError, TransientError
from ..events import Event
from ..kube import ObjectRef
from ..maintenance import maintain
from ..pg import conversion as sqlc
from ..pg import export as sqle
from ..schedule import next_run, rfc3339, zone
from ..specs import builders
from ..storage import open_store
from .base import (
    CONFLICT,
    Context,
    Result,
    StatusWriter,
    check_destination,
    destination_credentials,
    ensure_finalizer,
    load_profile,
    same_table,
)
from .retentionpolicy import export_status

SLICE_SECONDS = 5.0  # one reconcile converts this long, then reports progress and comes back

RETENTION_BLOCKED = "RetentionBlocked"
AWARE = default_of(RetentionPolicySpec, "partition_aware")


def conversion_fields(report: Conversion) -> ProgressStatus:
    """status.conversion from the state row: counts, rate, ETA and the longest lock."""
    rate = round(report.rows_per_second, 1) if report.rows_per_second is not None else None
    started = report.started_at.astimezone(UTC) if report.started_at is not None else None
    return ProgressStatus(
        step=report.phase,
        rows_total=report.rows_total,
        rows_done=report.rows_copied,
        rows_per_second=rate,
        eta_seconds=report.eta_seconds,
        started_at=rfc3339(started) if started else None,
        longest_lock_ms=report.longest_lock_ms,
    )


class PartitionPolicyController:
    """Converts a plain table online, then creates partitions ahead and retires them behind."""

    kind = PARTITION_POLICY

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: PartitionPolicySpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        zone(spec.time_zone)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        schema, table = spec.table.schema_, spec.table.name
        interval = spec.maintenance_or_default.interval_seconds
        events: list[Event] = []
        self._cron_job(ctx, obj, ref, spec, profile)
        self._conflict(ctx, obj, ref, spec, status)
        with pg.connect(info) as conn:
            # Partition bounds in status read in the policy's time zone, where they fall at midnight.
            conn.execute("SELECT set_config('TimeZone', %s, false)", (spec.time_zone,))
            columns = require_table(conn, spec.table, owner=True)
            require_column(columns, spec.column, "column", spec.table, TIME_TYPES, "timestamp, timestamptz or date")
            partitioned = pg.is_partitioned(conn, schema, table)
            progress = conversion_status(conn, profile.state_schema, spec)
            converting = not partitioned or progress.phase in sqlc.IN_FLIGHT
            enabled = spec.conversion_or_default.enabled
            # Before the first step, not after it: a policy deleted between slices must not leave the
            # sync trigger behind on the application's table.
            ensure_finalizer(ctx, self.kind, obj, needed=converting and (enabled or progress.phase in sqlc.IN_FLIGHT))
            if converting:
                if spec.suspend:
                    status.update(Status(partitioned=partitioned, conversion=conversion_fields(progress)))
                    return Result(
                        "Suspended",
                        f"{spec.table.qualified()}: conversion suspended in phase {progress.phase}",
                        requeue_after=interval,
                    )
                if not enabled and progress.phase != "swapped":  # after the switch there is no way back
                    aborted = sqlc.abort(conversion_subject(conn, profile.state_schema, spec), lock_ms(spec))
                    if aborted is None:
                        raise TransientError(
                            "a conversion run holds the table; disabling it waits for the run",
                            reason="ConversionBusy",
                            retry_seconds=5,
                        )
                    if aborted:
                        events.append(
                            Event(
                                "ConversionAborted",
                                "conversion disabled: the copy and its trigger were "
                                f"removed; {spec.table.qualified()} is as it was",
                            )
                        )
                    status.update(Status(partitioned=False, conversion=None))
                    return Result(
                        "NotPartitioned",
                        f"{spec.table.qualified()} is not partitioned; conversion is "
                        "disabled (spec.conversion.enabled: false)",
                        requeue_after=interval,
                        events=events,
                    )
                try:
                    report = convert(conn, spec, profile.state_schema, datetime.now(UTC), budget=SLICE_SECONDS)
                except SpecError:
                    self._release_if_untouched(ctx, obj, conn, profile.state_schema, spec)
                    raise
                events += report.events or []
                status.update(Status(conversion=conversion_fields(report)))
                if not report.finished:
                    status.update(Status(partitioned=False))
                    done = f"{report.rows_copied}" + (f"/{report.rows_total}" if report.rows_total else "")
                    return Result(
                        "Converting",
                        f"{spec.table.qualified()}: {report.phase}, {done} rows copied",
                        done=False,
                        requeue_after=0.5,
                        events=events,
                    )
                ensure_finalizer(ctx, self.kind, obj, needed=False)
            if spec.suspend:
                status.update(Status(partitioned=True))
                return Result("Suspended", f"{spec.table.qualified()}: maintenance suspended", requeue_after=interval)
            export, location = None, None
            if spec.retention is not None and spec.retention.export is not None:
                destination = spec.retention.export.destination
                if destination.filesystem is not None:
                    raise SpecError(
                        "retention.export.destination.filesystem",
                        "maintenance runs in the operator, which mounts no volume: export partitions to an s3 "
                        "destination, or export them with a RetentionPolicy (its job pods mount the volume)",
                    )
                location = check_destination(ctx, ref.namespace, destination, "retention.export.destination")
                # Imported here: pgscale.export loads pyarrow (~50 MB), which an operator without exports never needs.
                from ..export import partition_exporter, partition_policy_key

                export = partition_exporter(
                    conn,
                    open_store(
                        destination,
                        destination_credentials(ctx, ref.namespace, destination, "retention.export.destination"),
                    ),
                    state_schema=profile.state_schema,
                    policy=partition_policy_key(ref.namespace, ref.name),
                    source=(schema, table),
                    age_column=spec.column,
                    destination=destination.wire(),
                )
            report_m = maintain(conn, spec, datetime.now(UTC), export=export)
            if export is not None:
                from ..export import partition_policy_key

                totals = sqle.totals(conn, profile.state_schema, partition_policy_key(ref.namespace, ref.name))
                status.update(Status(export=export_status(totals, location)))
            before = [c for c in status.conditions if c.status == "True"]
        if report_m.busy:
            return Result(
                "Maintained",
                f"{spec.table.qualified()}: another maintenance run holds the table; looked at again shortly",
                requeue_after=30,
                events=events,
            )
        last = MaintenanceRun(
            time=now_rfc3339(),
            created=report_m.created,
            detached=report_m.detached,
            dropped=report_m.dropped,
            exported=report_m.exported,
            rows_moved_from_default=report_m.moved_from_default,
        )
        status.update(
            Status(
                partitioned=True,
                partitions=report_m.partitions,
                partition_count=report_m.count,
                last_maintenance=last,
                next_maintenance_time=rfc3339(datetime.now(UTC) + timedelta(seconds=interval)),
            )
        )
        for verb, names in (
            ("Created", report_m.created),
            ("Detached", report_m.detached),
            ("Dropped", report_m.dropped),
            ("Exported", report_m.exported),
        ):
            if names:
                events.append(Event(f"Partitions{verb}", ", ".join(names)))
        if report_m.moved_from_default:
            events.append(
                Event(
                    "RowsMovedFromDefault",
                    f"{report_m.moved_from_default} rows moved out of the DEFAULT partition into their partitions",
                )
            )
        status.conditions = cond.flag(
            status.conditions,
            RETENTION_BLOCKED,
            bool(report_m.kept),
            "PartitionReferenced",
            "partitions past spec.retention.keep stay attached because rows of other tables reference them: "
            f"{'; '.join(report_m.kept)}. Archive or delete those rows first (a RetentionPolicy with "
            "spec.children does it), or drop the foreign key",
            status.generation,
        )
        if report_m.kept and not any(c.type == RETENTION_BLOCKED for c in before):
            events.append(Event("PartitionsKept", "; ".join(report_m.kept)[:1000], warning=True))
        message = f"{spec.table.qualified()}: {report_m.count} partitions, {spec.interval} by {spec.column!r}"
        if report_m.skipped:
            message += f"; retried next time: {', '.join(report_m.skipped)}"
        return Result("Maintained", message, requeue_after=interval, events=events)

    def _cron_job(
        self, ctx: Context, obj: dict[str, Any], ref: ObjectRef, spec: PartitionPolicySpec, profile: DatabaseProfileSpec
    ) -> None:
        """The optional CronJob running `pgscale job partition-maintenance` (removed when not asked for)."""
        maintenance = spec.maintenance_or_default
        name = builders.job_name(ref, "partition-maintenance")
        if not maintenance.cron_job:
            ctx.kube.delete("batch/v1", "CronJob", ref.namespace, name)
            return
        next_run(maintenance.schedule, spec.time_zone, field="maintenance.schedule")  # a schedule that never fires
        export = spec.retention.export if spec.retention else None
        extra, volumes = builders.destination_env(export.destination if export else None)
        ctx.kube.apply(
            builders.cron_job(
                ref,
                suffix="partition-maintenance",
                schedule=maintenance.schedule,
                time_zone="UTC",
                suspend=spec.suspend,
                args=builders.job_args("partition-maintenance", ref),
                template=maintenance.job,
                default_image=ctx.config.image,
                env=builders.job_env(ref, obj["spec"], profile) + extra,
                volumes=volumes,
            )
        )

    def _conflict(
        self, ctx: Context, obj: dict[str, Any], ref: ObjectRef, spec: PartitionPolicySpec, status: StatusWriter
    ) -> None:
        claimants = [
            o["metadata"]["name"]
            for o in ctx.kube.list_resources(RETENTION_POLICY, ref.namespace)
            if same_table(o.get("spec") or {}, obj["spec"]) and (o.get("spec") or {}).get("partitionAware", AWARE)
        ]
        status.conditions = cond.flag(
            status.conditions,
            CONFLICT,
            bool(spec.retention and claimants),
            "RetentionPolicyOnSameTable",
            f"RetentionPolicy {', '.join(claimants)} also trims {spec.table.qualified()}; this policy owns "
            "its partitions and the RetentionPolicy works row by row only",
            status.generation,
        )

    def _release_if_untouched(
        self,
        ctx: Context,
        obj: dict[str, Any],
        conn: psycopg.Connection,
        state_schema: str,
        spec: PartitionPolicySpec,
    ) -> None:
        """A conversion refused before its first step changed nothing: no finalizer to strand a namespace."""
        try:
            phase = conversion_status(conn, state_schema, spec).phase
        except Exception:  # the original error matters more; the finalizer stays, which is safe
            return
        if phase not in sqlc.IN_FLIGHT:
            ensure_finalizer(ctx, self.kind, obj, needed=False)

    def left_behind(self, obj: dict[str, Any], spec: PartitionPolicySpec) -> str:
        """What an unfinished conversion keeps in the database when its profile is gone, and the SQL to remove it."""
        schema, table = spec.table.schema_, spec.table.name
        return (
            f"if a conversion of {spec.table.qualified()} was under way, its sync trigger on the table, the "
            "partitioned copy, the change log and the trigger functions (in the profile's stateSchema, default "
            f"pgscale). Remove them as the table's owner: {sqlc.manual_abort('pgscale', schema, table)}"
        )

    def finalize(self, ctx: Context, obj: dict[str, Any], spec: PartitionPolicySpec) -> None:
        """A policy deleted mid-conversion: remove the trigger and the copy, so the table is as it was."""
        ref = ObjectRef.of(obj)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        with pg.connect(info) as conn:
            if conversion_status(conn, profile.state_schema, spec).phase == "swapped":
                convert(conn, spec, profile.state_schema, datetime.now(UTC))  # past the switch: finish, drop the old
                return
            aborted = sqlc.abort(conversion_subject(conn, profile.state_schema, spec), lock_ms(spec))
        if aborted is None:
            raise TransientError(
                "a conversion run holds the table; deletion waits for it", reason="ConversionBusy", retry_seconds=5
            )
        if aborted:
            ctx.kube.event(
                ref,
                "ConversionAborted",
                f"policy deleted: the copy and its trigger were removed; {spec.table.qualified()} is as it was",
            )
