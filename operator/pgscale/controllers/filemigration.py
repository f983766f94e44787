"""FileMigration controller: check the table and destination, run the migration Job, report progress.

The work is `pgscale job file-migration` (jobs/files.py) in a Job; its ledger in the
database is the truth this controller reads: how many rows are migrated, failed or
left, how fast, and which phase the table is in. A Job runs per spec generation;
a new one starts when the spec moves to a later phase or new rows need work.
"""

from __future__ import annotations

from typing import Any

from .. import pg
from ..api import FILE_MIGRATION
from ..api.databaseprofile import DatabaseProfileSpec
from ..api.filemigration import FailedRow, FileMigrationSpec, MigrationPhase
from ..api.filemigration import FileMigrationStatus as Status
from ..checks import TEXT_TYPES, require_column, require_table
from ..conditions import now_rfc3339
from ..errors import DependencyError, SpecError
from ..events import Event
from ..files import source
from ..kube import ObjectRef
from ..pg import files as sqlf
from ..progress import eta
from ..specs import builders
from .base import Context, Result, StatusWriter, destination_credentials, load_profile

POLL_SECONDS = 10.0
MAX_FAILED_JOBS = 5


def job_state(job: dict[str, Any] | None) -> str:
    """missing | active | succeeded | failed."""
    if job is None:
        return "missing"
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    return "active"


class FileMigrationController:
    """Validates the migration, keeps a Job running while there is work, reports the ledger."""

    kind = FILE_MIGRATION

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: FileMigrationSpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        destination_credentials(ctx, ref.namespace, spec.destination, "destination")
        src = source(spec)
        policy = f"{ref.namespace}/{ref.name}"
        with pg.connect(info) as conn:
            columns = require_table(conn, spec.table, privileges=("SELECT", "UPDATE"))
            require_column(columns, spec.key_column, "keyColumn", spec.table)
            for field, column in (spec.columns.wire() if spec.columns else {}).items():
                require_column(columns, column, f"columns.{field}", spec.table)
            sqlf.ensure_ledger(conn, profile.state_schema)
            dropped = spec.data_column not in columns
            if dropped and not sqlf.has_nulled(conn, policy, profile.state_schema):
                require_column(columns, spec.data_column, "dataColumn", spec.table)  # not dropped by us: a typo
            if not dropped:
                expected = TEXT_TYPES if spec.encoding == "base64" else frozenset({"bytea"})
                what = "text or varchar for base64" if spec.encoding == "base64" else "bytea"
                require_column(columns, spec.data_column, "dataColumn", spec.table, expected, what)
            counts = sqlf.counts(conn, profile.state_schema, policy)
            cutover = spec.phase in ("cutover", "dropSource")
            remaining = (
                0 if dropped else sqlf.count_candidates(conn, src, policy, profile.state_schema, cutover=cutover)
            )
            holding = 0 if dropped else sqlf.rows_with_data(conn, src)
            ready = 0 if dropped else sqlf.count_ready_to_null(conn, src, policy, profile.state_schema)
            stuck = 0 if dropped else sqlf.count_failed_holding(conn, src, policy, profile.state_schema)
        by = counts.by_status
        migrated = by.get("verified", 0) + by.get("cutover", 0) + by.get("nulled", 0)
        failed = by.get("failed", 0)
        phase: MigrationPhase
        if dropped:
            phase = "Completed"
        elif remaining:
            phase = "CuttingOver" if cutover else "Copying"
        elif spec.phase == "dropSource" and ready > 0:
            phase = "DroppingSource"
        elif spec.phase == "dropSource" and spec.drop_column and holding == 0:
            phase = "Verifying"
        else:
            phase = "Completed"
        events: list[Event] = []
        current = status.read(Status)
        if current.phase != phase:
            events.append(Event(f"Phase{phase}", f"{current.phase or 'Pending'} -> {phase}"))
        rate = counts.rows_last_minute / 60.0
        total = migrated + failed + remaining
        status.update(
            Status(
                phase=phase,
                rows_total=total,
                rows_migrated=migrated,
                rows_failed=failed,
                rows_remaining=remaining,
                bytes_migrated=counts.bytes_done,
                rows_per_second=round(rate, 2),
                bytes_per_second=round(counts.bytes_last_minute / 60.0, 1),
                eta_seconds=eta(migrated, migrated + remaining, rate) if remaining else None,
                progress=f"{100.0 * migrated / total:.1f}%" if total else "100.0%",
                failed_rows=[FailedRow(key=k[:1024], reason=r[:1024]) for k, r in counts.failed],
                # Base64 text takes 4/3 of the file's size in the table (before TOAST compression).
                reclaimable_bytes=counts.bytes_nulled * 4 // 3 if spec.encoding == "base64" else counts.bytes_nulled,
                started_at=current.started_at or now_rfc3339(),
            )
        )
        if phase == "Completed":
            status.update(Status(completed_at=current.completed_at or now_rfc3339()))
            if spec.phase == "dropSource" and spec.drop_column and not dropped and stuck:
                raise SpecError(
                    "phase",
                    f"{stuck} rows could not be migrated (status.failedRows, and the ledger table "
                    f"{profile.state_schema}.file_ledger); the column {spec.data_column!r} is kept until they are "
                    "fixed or deleted",
                    reason="RowsFailed",
                )
            return Result("Completed", self._summary(spec, migrated, failed, dropped), events=events)
        status.update(Status(completed_at=None))
        if spec.suspend:
            running = current.job_name
            if running and job_state(ctx.kube.read("batch/v1", "Job", ref.namespace, running)) == "active":
                ctx.kube.delete("batch/v1", "Job", ref.namespace, running)  # SIGTERM: stops after its row
            # Paused on purpose, nothing wrong: Ready like the other kinds when suspended (kstatus Current).
            return Result(
                "Suspended", f"{phase}: suspended with {remaining} rows left", requeue_after=ctx.config.resync_seconds
            )
        job_name, started = self._ensure_job(ctx, obj, ref, spec, profile, status)
        events += started
        message = f"{phase}: {migrated}/{total} rows, {failed} failed; Job {job_name}"
        return Result(phase, message, done=False, requeue_after=POLL_SECONDS, events=events)

    @staticmethod
    def _summary(spec: FileMigrationSpec, migrated: int, failed: int, dropped: bool) -> str:
        what = {"copy": "copied and verified", "cutover": "pointing at their objects", "dropSource": "moved"}[
            spec.phase
        ]
        tail = f"; column {spec.data_column!r} dropped" if dropped else ""
        if spec.phase == "dropSource":
            tail += " (VACUUM ran: the space is reusable; VACUUM FULL or pg_repack returns it to the OS)"
        return f"{migrated} files {what}, {failed} failed{tail}"

    def _ensure_job(
        self,
        ctx: Context,
        obj: dict[str, Any],
        ref: ObjectRef,
        spec: FileMigrationSpec,
        profile: DatabaseProfileSpec,
        status: StatusWriter,
    ) -> tuple[str, list[Event]]:
        """One Job per generation; another when the last one finished with work left."""
        generation = obj["metadata"].get("generation", 1)
        current = status.read(Status).job_name
        prefix = builders.job_name(ref, f"files-{generation}")
        attempt = 0
        if current and current.startswith(prefix + "-"):
            attempt = int(current.rsplit("-", 1)[1])
            state = job_state(ctx.kube.read("batch/v1", "Job", ref.namespace, current))
            if state == "active":
                return current, []
            if state == "failed" and attempt + 1 >= MAX_FAILED_JOBS:
                raise DependencyError(
                    f"Job {current} failed after {attempt + 1} attempts; see `kubectl logs job/{current}`. "
                    "Fix the cause, then change the spec: a new generation starts over",
                    reason="JobFailed",
                )
            if state in ("succeeded", "failed"):
                attempt += 1
        elif current:  # a Job of an older generation: stop it (it ends after its current row)
            ctx.kube.delete("batch/v1", "Job", ref.namespace, current)
        name = f"{prefix}-{attempt}"
        extra, volumes = builders.destination_env(spec.destination)
        env = builders.job_env(ref, obj["spec"], profile) + extra
        job = builders.job(
            ref,
            name=name,
            suffix="file-migration",
            args=builders.job_args("file-migration", ref),
            template=spec.job,
            default_image=ctx.config.image,
            env=env,
            volumes=volumes,
        )
        ctx.kube.apply(job)
        status.update(Status(job_name=name))
        return name, [Event("JobStarted", f"started Job {name} for phase {spec.phase}")]
