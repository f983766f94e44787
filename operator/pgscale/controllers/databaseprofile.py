"""DatabaseProfile controller: settings kept, metrics and alerts, capacity projected.

Each reconcile: resolve the connection, pick how settings are applied
(settings_method.resolve), make them what the spec asks (tuning.desired ->
server_settings.reconcile or reconcile_database, after undoing another method's
values), take a statistics snapshot for the metrics endpoint, sample sizes for the
capacity projection, evaluate alert thresholds, and say all of it in status,
conditions and Events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from .. import cnpg, pg, server_settings, settings_method, tuning
from .. import conditions as cond
from ..api import DATABASE_PROFILE
from ..api.databaseprofile import (
    ActiveAlert,
    AlertsSpec,
    CapacitySpec,
    CapacityStatus,
    DatabaseProfileSpec,
    MonitoringSpec,
    PoolerStatus,
    ReplicaStatus,
    TableCapacity,
)
from ..api.databaseprofile import DatabaseProfileStatus as Status
from ..conditions import now_rfc3339
from ..durations import seconds
from ..errors import DependencyError, SpecError
from ..events import Event
from ..kube import ObjectRef
from ..monitoring import COLLECTOR, evaluate, growth_per_month
from ..pg import replication, stats
from ..pg import settings as pgs
from ..pg.connection import ConnInfo
from ..quantity import parse_quantity
from ..specs import alerting, pooling, replicas
from .base import Context, Result, StatusWriter, ensure_finalizer, profile_secret, secret_connection

log = logging.getLogger(__name__)

RESTART_REQUIRED = "RestartRequired"
SETTINGS_CONFLICT = "SettingsConflict"
EXTERNAL = "ParametersExternal"
LEFT_BEHIND = "SettingsLeftBehind"
DRIFT_EVENTS = server_settings.DriftEvents(600.0)  # per operator process: a new leader may say it once more


def claim(obj: dict[str, Any], system_id: str, names: Iterable[str], scope: str = "") -> server_settings.Claim:
    meta = obj["metadata"]
    return server_settings.Claim(
        meta.get("namespace", ""),
        meta["name"],
        str(meta.get("creationTimestamp") or ""),
        system_id,
        frozenset(names),
        scope,
    )


OVERRIDDEN = "ParametersOverridden"
ALERTING = "AlertsFiring"


def human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"


def memory_of(spec: DatabaseProfileSpec) -> int | None:
    """The primary's memory, from resources or the tier's hardware."""
    if spec.resources is not None:
        return parse_quantity(spec.resources.memory)
    if spec.tier is not None:
        return tuning.TIERS[spec.tier].memory_bytes
    return None


class DatabaseProfileController:
    """Applies and keeps settings, reports the server, its growth and its alerts."""

    kind = DATABASE_PROFILE

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: DatabaseProfileSpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        key = f"{ref.namespace}/{ref.name}"
        monitoring = spec.monitoring_or_default
        capacity = spec.capacity_or_default
        info, labels = profile_secret(ctx, ref.namespace, spec)
        desired = tuning.desired(spec)
        previous = status.read(Status)
        with pg.pooled(info) as conn:  # one of a few sessions per database, not one per reconcile
            version, _ = pg.server_version(conn)
            system_id = pgs.system_identifier(conn)
            recorded = server_settings.records(conn, spec.state_schema, key)
            facts = pgs.privileges(conn, sorted(set(desired) | recorded.names))
            status.update(Status(server_version=version, system_identifier=system_id, database=facts.database))
            method = self._resolve(ctx, ref, spec, labels, facts, desired)
            status.update(
                Status(settings_method=method.method, settings_method_reason=method.reason, cluster=method.cluster)
            )
            self._check_owner(ctx, obj, conn, self._claim(obj, spec, conn, system_id, method, facts, desired), desired)
            events: list[Event] = []
            cluster = ""
            # --- cloudnativepg method (cnpg.py): the Cluster's parameters and instances, CloudNativePG Poolers
            if method.method == "cloudnativepg":
                if previous.replicas is not None:  # switched from pgscale's own replicas and PgBouncer: remove them
                    no_replicas = spec.model_copy(update={"read_replicas": None})
                    events += self._replicas(ctx, obj, ref, no_replicas, info, conn, status)
                if previous.pooler is not None and previous.settings_method != "cloudnativepg":
                    events += self._pooler(ctx, ref, spec.model_copy(update={"pooling": None}), info, status)
            elif previous.cluster:  # switched away from cloudnativepg: give the Cluster's fields back
                events += cnpg.release(ctx, ref, previous.cluster)
                status.update(Status(cluster=None, pooler=None))
            # --- end cloudnativepg
            report, retired, outcome = self._apply_settings(
                ctx, obj, spec, conn, info, method, desired, facts, recorded, status=status, previous=previous
            )
            if outcome is not None:
                cluster = outcome.cluster
                events += outcome.events
            snap = stats.snapshot(conn, statements=monitoring.statements) if monitoring.enabled else None
            points: dict[str, list[tuple[float, int]]] = {}
            if snap is not None:
                stats.ensure_samples(conn, spec.state_schema)
                age = stats.last_sample_age_seconds(conn, spec.state_schema, key)
                if age is None or age >= seconds(capacity.sample_interval):
                    sizes = {"": snap.database_bytes, **{t.name: t.bytes for t in snap.tables}}
                    stats.record_sample(conn, spec.state_schema, key, sizes)
                points = stats.samples(conn, spec.state_schema, key)
            if method.method != "cloudnativepg":
                events += self._replicas(ctx, obj, ref, spec, info, conn, status)
        if previous.settings_method is not None and previous.settings_method != method.method:
            events.append(
                Event(
                    "SettingsMethodChanged",
                    f"settings are now kept by the {method.method} method (was {previous.settings_method}): "
                    f"{method.reason}",
                )
            )
        events += self._settings_events(key, report, retired, status, method.method)
        status.update(
            Status(
                parameters=report.parameters, pending_restart=report.pending_restart, last_reconcile_time=now_rfc3339()
            )
        )
        if method.method == "cloudnativepg":
            events += cnpg.poolers(ctx, ref, spec, cluster, status)
        else:
            events += self._pooler(ctx, ref, spec, info, status)
        if snap is not None:
            COLLECTOR.update(key, snap, len(report.pending_restart))
            events += self._capacity_and_alerts(spec, status, snap, points, capacity, monitoring.alerts_or_default)
        events += self._prometheus_rule(ctx, ref, monitoring, status)
        requeue = min(seconds(spec.reconcile_interval), seconds(monitoring.interval))
        kept = sum(1 for p in report.parameters if p.applied)
        message = f"Connected to PostgreSQL {version} at {info.describe()}; "
        if method.method == "alterSystem":
            message += f"{len(desired)} settings kept"
        else:
            message += f"{kept} of {len(desired)} settings kept ({method.method} method)"
        if cluster:
            message += f" in CloudNativePG Cluster {cluster}"
        if report.pending_restart:
            message += f", {len(report.pending_restart)} waiting for a restart"
        if report.external:
            message += f", {len(report.external)} to set in the server's configuration"
        return Result("Connected", message, requeue_after=requeue, events=events)

    def _resolve(
        self,
        ctx: Context,
        ref: ObjectRef,
        spec: DatabaseProfileSpec,
        labels: dict[str, str],
        facts: pgs.Privileges,
        desired: dict[str, tuple[str, str]],
    ) -> settings_method.Resolution:
        """spec.settings.method, auto resolved from the Secret, the Cluster and the role's privileges."""
        settings = spec.settings_or_default
        candidate = settings_method.cluster_candidate(settings, labels)
        found = candidate is not None and settings.method in ("auto", "cloudnativepg")
        found = found and cnpg.cluster_exists(ctx, ref.namespace, str(candidate))
        return settings_method.resolve(settings, secret_labels=labels, cluster_found=found, facts=facts, names=desired)

    def _claim(
        self,
        obj: dict[str, Any],
        spec: DatabaseProfileSpec,
        conn: psycopg.Connection,
        system_id: str,
        method: settings_method.Resolution,
        facts: pgs.Privileges,
        desired: dict[str, tuple[str, str]],
    ) -> server_settings.Claim:
        """What this profile sets: server-wide, or (database method) its database's values only."""
        if method.method != "database":
            return claim(obj, system_id, desired)
        where = server_settings.placed(conn, desired, facts)
        scope = server_settings.scope_of(facts.database, spec.settings_or_default.role)
        return claim(obj, system_id, [n for n in desired if where[n] == "database"], scope)

    def _apply_settings(
        self,
        ctx: Context,
        obj: dict[str, Any],
        spec: DatabaseProfileSpec,
        conn: psycopg.Connection,
        info: ConnInfo,
        method: settings_method.Resolution,
        desired: dict[str, tuple[str, str]],
        facts: pgs.Privileges,
        recorded: server_settings.Records,
        *,
        status: StatusWriter,
        previous: Status,
    ) -> tuple[server_settings.SettingsReport, list[server_settings.Retired], cnpg.Outcome | None]:
        """Keep the settings by the method resolved, after undoing what another method had set.

        `previous` is the status as the reconcile found it: the cloudnativepg method gives back a
        Cluster that is no longer the profile's."""
        ref = ObjectRef.of(obj)
        key = f"{ref.namespace}/{ref.name}"
        schema = spec.state_schema
        retired: list[server_settings.Retired | None] = []
        if method.method != "database":
            retired.append(server_settings.retire_database(conn, schema, key, recorded.database, facts))
        if method.method != "alterSystem":
            retired.append(server_settings.retire_alter_system(conn, schema, key, recorded.alter_system, facts))
        done = [r for r in retired if r is not None]
        if method.method == "alterSystem":
            return server_settings.reconcile(conn, schema, key, desired), done, None
        if method.method == "database":
            report = server_settings.reconcile_database(
                conn,
                info,
                state_schema=schema,
                profile=key,
                desired=desired,
                facts=facts,
                role=spec.settings_or_default.role,
            )
            return report, done, None
        outcome = cnpg.reconcile(ctx, conn, obj, spec, desired, status, previous=previous, reason=method.reason)
        return outcome.report, done, outcome

    def _settings_events(
        self,
        key: str,
        report: server_settings.SettingsReport,
        retired: list[server_settings.Retired],
        status: StatusWriter,
        method: str,
    ) -> list[Event]:
        """Events and conditions of the settings step: applied, corrected, reset, waiting for a restart,
        overridden, to be set elsewhere, left behind by a previous method."""
        events: list[Event] = []
        if report.applied:
            events.append(Event("ParametersApplied", f"{report.statement}: {', '.join(report.applied)}"))
        if report.corrected:
            log.info("DatabaseProfile %s: changed outside pgscale, set back: %s", key, ", ".join(report.corrected))
            due = DRIFT_EVENTS.due(key, report.corrected, time.monotonic())
            if due:
                events.append(
                    Event(
                        "DriftCorrected",
                        f"changed outside pgscale, set back: {', '.join(due)} (at most one "
                        "Event per parameter every 10 minutes)",
                        warning=True,
                    )
                )
        if report.reset:
            events.append(Event("ParametersReset", f"no longer in the spec, reset: {', '.join(report.reset)}"))
        for r in retired:
            if r.reset:
                events.append(
                    Event(
                        "ParametersReset", f"set by the {r.method} method, no longer used, reset: {', '.join(r.reset)}"
                    )
                )
        left = [r for r in retired if r.left]
        left_message = "; ".join(
            f"{', '.join(r.left)} set by the {r.method} method stay ({r.why}): {r.fix}" for r in left
        )
        previous_left = cond.get(status.conditions, LEFT_BEHIND)
        status.conditions = cond.flag(
            status.conditions, LEFT_BEHIND, bool(left), "ResetRefused", left_message, status.generation
        )
        if left and (previous_left is None or previous_left.message != left_message):
            events.append(Event(LEFT_BEHIND, left_message, warning=True))
        previous_restart = cond.get(status.conditions, RESTART_REQUIRED)
        restart_message = f"restart the server to apply: {', '.join(report.pending_restart)}"
        if method == "cloudnativepg":
            restart_message = cnpg.restart_message(report.pending_restart)
        status.conditions = cond.flag(
            status.conditions,
            RESTART_REQUIRED,
            bool(report.pending_restart),
            "PendingRestart",
            restart_message,
            status.generation,
        )
        if report.pending_restart and (previous_restart is None or previous_restart.message != restart_message):
            events.append(Event("RestartRequired", restart_message, warning=True))
        overridden = ", ".join(f"{n} (set by {src})" for n, src in sorted(report.overridden.items()))
        where = (
            "e.g. -c options on the server's command line"
            if report.overriding == "ALTER SYSTEM"
            else "e.g. ALTER ROLE ... SET of the connecting role, or PGOPTIONS"
        )
        status.conditions = cond.flag(
            status.conditions,
            OVERRIDDEN,
            bool(report.overridden),
            "OverriddenBySource",
            f"a source that wins over {report.overriding} keeps other values: {overridden}; remove them there "
            f"({where})",
            status.generation,
        )
        events += self._external(report, status)
        return events

    def _external(self, report: server_settings.SettingsReport, status: StatusWriter) -> list[Event]:
        """ParametersExternal: the settings the method cannot set, with the values to set elsewhere."""
        waiting = {p.name for p in report.parameters if p.pending_restart and not p.applied}
        pairs = ", ".join(
            f"{n}={v}" + (" (the server has a new value waiting for a restart)" if n in waiting else "")
            for n, v in sorted(report.external.items())
        )
        message = (
            "the database method cannot set these server-level settings; set them in the provider's parameter "
            f"group or the server's configuration: {pairs}"
        )
        if report.privileged:
            names = ", ".join(sorted(report.privileged))
            message += (
                f" ({names} may also be set per database by a superuser, or by this role after GRANT SET ON "
                f"PARAMETER {names} TO it, PostgreSQL 15+)"
            )
        previous = cond.get(status.conditions, EXTERNAL)
        status.conditions = cond.flag(
            status.conditions, EXTERNAL, bool(report.external), "SetElsewhere", message, status.generation
        )
        if report.external and (previous is None or previous.message != message):
            return [Event(EXTERNAL, message, warning=True)]
        return []

    def _check_owner(
        self,
        ctx: Context,
        obj: dict[str, Any],
        conn: psycopg.Connection,
        me: server_settings.Claim,
        desired: dict[str, tuple[str, str]],
    ) -> None:
        """Stall (SettingsConflict) when an earlier profile keeps the same server's server-wide settings, or
        (database method) the same database's values."""
        if not me.parameters:
            return
        others = []
        contexts: dict[str, pgs.Setting] = {}
        for other in ctx.kube.list_watched(self.kind, ctx.config.namespaces):
            stored = Status.from_stored(other.get("status"))
            if stored.system_identifier != me.system_identifier or other["metadata"].get("deletionTimestamp"):
                continue
            try:
                other_spec = DatabaseProfileSpec.model_validate(other.get("spec") or {})
            except ValidationError:
                continue  # an invalid profile applies nothing
            other_settings = other_spec.settings_or_default
            method = other_settings.method if other_settings.method != "auto" else stored.settings_method
            try:
                names = sorted(tuning.desired(other_spec))
            except SpecError:
                continue  # an invalid profile applies nothing
            if method != "database":  # alterSystem, cloudnativepg, or not known yet: server-wide
                others.append(claim(other, me.system_identifier, names))
                continue
            if not stored.database or me.scope != server_settings.scope_of(stored.database, other_settings.role):
                continue  # another database's values (or not known yet) never meet mine
            missing = sorted(set(names) - set(contexts))
            if missing:
                contexts.update(pgs.describe(conn, missing))
            capable = [n for n in names if settings_method.database_capable(contexts.get(n), n)]
            others.append(claim(other, me.system_identifier, capable, me.scope))
        conflict = server_settings.settings_owner(me, others)
        if conflict is not None:
            first = conflict.parameters[0]
            source = desired[first][1] if first in desired else "parameters"
            raise SpecError(
                server_settings.field_of(first, source),
                conflict.message(me.system_identifier),
                reason=SETTINGS_CONFLICT,
            )

    def _capacity_and_alerts(
        self,
        spec: DatabaseProfileSpec,
        status: StatusWriter,
        snap: stats.Snapshot,
        points: dict[str, list[tuple[float, int]]],
        capacity: CapacitySpec,
        alerts_spec: AlertsSpec,
    ) -> list[Event]:
        growth = growth_per_month(points.get("", []))
        projected = int(snap.database_bytes + max(growth or 0.0, 0.0) * capacity.horizon_months)
        tables = []
        for t in snap.tables:
            table_growth = growth_per_month(points.get(t.name, []))
            entry = TableCapacity(name=t.name[:256], bytes=t.bytes)
            if table_growth is not None:
                entry.growth_bytes_per_month = int(table_growth)
            tables.append(entry)
        cap = CapacityStatus(
            sampled_at=now_rfc3339(),
            database_bytes=snap.database_bytes,
            database_size=human(snap.database_bytes),
            projected_bytes=projected,
            horizon_months=capacity.horizon_months,
            recommended_tier=tuning.recommend_tier(projected),
            tables=tables,
        )
        if growth is not None:
            cap.growth_bytes_per_month = int(growth)
        status.update(Status(capacity=cap))
        if not alerts_spec.enabled:
            status.update(Status(alerts=[]))
            status.conditions = cond.remove(status.conditions, ALERTING)
            return []
        alerts = evaluate(
            alerts_spec,
            snap,
            growth_bytes_per_month=growth,
            growth_threshold_bytes=parse_quantity(alerts_spec.growth_per_month),
            memory_estimate=tuning.estimated_memory_bytes(snap.memory_settings),
            memory_bytes=memory_of(spec),
        )
        since = {a.name: a.since for a in status.read(Status).alerts}
        now = now_rfc3339()
        active = [
            ActiveAlert(name=a.name, value=a.value, threshold=a.threshold, since=since.get(a.name, now)) for a in alerts
        ]
        status.update(Status(alerts=active))
        status.conditions = cond.flag(
            status.conditions,
            ALERTING,
            bool(alerts),
            "ThresholdsExceeded",
            "; ".join(a.message for a in alerts),
            status.generation,
        )
        return [Event(f"Alert{a.name}", a.message, warning=True) for a in alerts if a.name not in since]

    def _pooler(
        self, ctx: Context, ref: ObjectRef, spec: DatabaseProfileSpec, info: ConnInfo, status: StatusWriter
    ) -> list[Event]:
        """PgBouncer in front of the primary (`-pooler-rw`) and, when replicas exist, of them (`-pooler-ro`):
        each a Secret (config and userlist), a Deployment and a Service."""
        events: list[Event] = []
        previous = status.read(Status).pooler
        replicas_on = spec.read_replicas is not None and spec.read_replicas.instances > 0
        backends: dict[pooling.Role, tuple[str, int]] = {
            "rw": (info.host, info.port),
            "ro": (f"{ref.name}-ro.{ref.namespace}.svc", replicas.PORT),
        }
        names: dict[pooling.Role, str] = {}
        config_hash = ""
        for role, (host, port) in backends.items():
            name = pooling.pooler_name(ref.name, role)
            wanted = spec.pooling is not None and (role == "rw" or (spec.pooling.read_replicas and replicas_on))
            before = previous and (previous.service if role == "rw" else previous.read_only_service)
            if not wanted:
                if before:
                    for api, kind, obj_name in (
                        ("v1", "Service", name),
                        ("apps/v1", "Deployment", name),
                        ("v1", "Secret", f"{name}-config"),
                    ):
                        ctx.kube.delete(api, kind, ref.namespace, obj_name)
                    events.append(Event("PoolerRemoved", f"removed PgBouncer {name}"))
                continue
            assert spec.pooling is not None
            try:
                ini = pooling.pgbouncer_ini(
                    spec.pooling,
                    backend_host=host,
                    backend_port=port,
                    dbname=info.dbname,
                    auth_file=f"{pooling.CONFIG_DIR}/userlist.txt",
                    admin_users=[info.user],
                )
                users = pooling.userlist(info.user, info.password or "")
            except ValueError as exc:
                raise SpecError("pooling", f"cannot configure PgBouncer: {exc}", reason="InvalidPooling") from exc
            digest = pooling.config_hash(ini, users)
            ctx.kube.apply(pooling.config_secret(ref, f"{name}-config", ini, users, role))
            ctx.kube.apply(
                pooling.deployment(ref, name, spec.pooling, ctx.config.pgbouncer_image, f"{name}-config", digest, role)
            )
            ctx.kube.apply(pooling.service(ref, name, role))
            names[role] = name
            config_hash = pooling.config_hash(config_hash, digest)
            if before != name:
                events.append(
                    Event(
                        "PoolerConfigured",
                        f"PgBouncer {name}: {spec.pooling.pool_mode} pooling, "
                        f"{spec.pooling.default_pool_size} server connections per pool",
                    )
                )
        if names:
            assert spec.pooling is not None
            pooler = PoolerStatus(service=names["rw"], instances=spec.pooling.instances, config_hash=config_hash)
            if "ro" in names:
                pooler.read_only_service = names["ro"]
            status.update(Status(pooler=pooler))
        else:
            status.update(Status(pooler=None))
        return events

    def _replicas(
        self,
        ctx: Context,
        obj: dict[str, Any],
        ref: ObjectRef,
        spec: DatabaseProfileSpec,
        info: ConnInfo,
        conn: psycopg.Connection,
        status: StatusWriter,
    ) -> list[Event]:
        """Slots on the primary, the StatefulSet of standbys, and the -ro/-rw Services."""
        events: list[Event] = []
        wanted_spec = spec.read_replicas
        existing = replication.slots(conn, replicas.slot_prefix(ref))
        wanted = replicas.slot_names(ref, wanted_spec.instances) if wanted_spec else []
        for name, slot in sorted(existing.items()):
            if name not in wanted:  # scaled down or switched off: the slot would keep WAL forever
                replication.drop_slot(conn, slot)
                events.append(Event("SlotDropped", f"dropped replication slot {name}"))
        if not wanted:
            if status.read(Status).replicas is not None:
                sts = replicas.statefulset_name(ref)
                for api, kind, name in (
                    ("apps/v1", "StatefulSet", sts),
                    ("v1", "ConfigMap", f"{sts}-bootstrap"),
                    ("v1", "Service", f"{ref.name}-ro"),
                    ("v1", "Service", f"{ref.name}-rw"),
                    ("discovery.k8s.io/v1", "EndpointSlice", f"{ref.name}-rw"),
                ):
                    ctx.kube.delete(api, kind, ref.namespace, name)
                status.update(Status(replicas=None))
            ensure_finalizer(ctx, self.kind, obj, needed=False)
            return events
        assert wanted_spec is not None
        ensure_finalizer(ctx, self.kind, obj, needed=True)  # slots live outside the cluster
        secret_name = wanted_spec.replication_secret_ref.name
        secret = ctx.kube.read_secret(ref.namespace, secret_name)
        if secret is None or not secret.get("username") or not secret.get("password"):
            raise DependencyError(
                f"Secret {secret_name!r} with keys username and password not found: create it for the replication "
                "role (spec.readReplicas.replicationSecretRef)",
                reason="SecretNotFound",
            )
        problems = replication.readiness_problems(conn, secret["username"], len(wanted))
        if problems:
            raise DependencyError(
                "the primary cannot serve replicas yet: " + "; ".join(problems), reason="ReplicationNotReady"
            )
        for name in wanted:
            if name not in existing:
                replication.create_slot(conn, name)
                events.append(Event("SlotCreated", f"created replication slot {name}"))
        host = wanted_spec.primary_host or info.host
        standbys = replicas.statefulset(
            ref, wanted_spec, image=ctx.config.postgres_image, primary_host=host, primary_port=info.port
        )
        services = [replicas.read_only_service(ref), *replicas.read_write_service(ref, info.host, info.port)]
        if replicas.unreachable_from_pods(info.host) and status.read(Status).replicas is None:
            events.append(
                Event(
                    "ReadWriteServiceSkipped",
                    f"no {ref.name}-rw Service: the primary's host {info.host} is "
                    "a loopback address pods cannot reach; set spec.connection.host",
                    warning=True,
                )
            )
        for item in (replicas.config_map(ref), standbys, *services):
            ctx.kube.apply(item)
        now = replication.slots(conn, replicas.slot_prefix(ref))
        streaming = replication.standbys(conn)
        sts = replicas.statefulset_name(ref)
        report = []
        for i, name in enumerate(wanted):
            pod = f"{sts}-{i}"
            entry = ReplicaStatus(name=pod, slot=name, active=bool(now.get(name) and now[name].active))
            if pod in streaming:
                entry.lag_bytes = streaming[pod].lag_bytes
                entry.lag_seconds = streaming[pod].lag_seconds
            report.append(entry)
        status.update(Status(replicas=report))
        return events

    def _prometheus_rule(
        self, ctx: Context, ref: ObjectRef, monitoring: MonitoringSpec, status: StatusWriter
    ) -> list[Event]:
        """The thresholds as a PrometheusRule (prometheus-operator), when asked for."""
        alerts = monitoring.alerts_or_default
        wanted = alerts.prometheus_rule is not None and alerts.prometheus_rule.enabled and monitoring.enabled
        name = alerting.rule_name(ref)
        if not wanted:
            if status.read(Status).prometheus_rule:
                ctx.kube.delete("monitoring.coreos.com/v1", "PrometheusRule", ref.namespace, name)
                status.update(Status(prometheus_rule=None))
            return []
        assert alerts.prometheus_rule is not None
        try:
            ctx.kube.apply(alerting.prometheus_rule(ref, alerts, alerts.prometheus_rule.labels))
        except ApiException as exc:
            if exc.status == 404:
                raise DependencyError(
                    "the PrometheusRule kind (monitoring.coreos.com/v1) is not installed in this cluster: install "
                    "prometheus-operator's CRDs, or set spec.monitoring.alerts.prometheusRule.enabled: false",
                    reason="PrometheusRuleCRDMissing",
                ) from exc
            raise
        first = status.read(Status).prometheus_rule != name
        status.update(Status(prometheus_rule=name))
        return [Event("PrometheusRuleApplied", f"alert rules in PrometheusRule {name}")] if first else []

    def left_behind(self, obj: dict[str, Any], spec: DatabaseProfileSpec) -> str:
        """The replication slots a profile whose Secret is gone could not drop, and how to drop them."""
        prefix = replicas.slot_prefix(ObjectRef.of(obj))
        drop = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE "
        return (  # for a person to run; the prefix holds only [a-z0-9_]
            f"its physical replication slots ({prefix}*), which keep WAL on the primary. Drop them there: "
            f"{drop}'{prefix}%';"
        )

    def finalize(self, ctx: Context, obj: dict[str, Any], spec: DatabaseProfileSpec) -> None:
        """Drop this profile's replication slots: left behind, they would keep WAL on the primary forever.
        Under the cloudnativepg method, give back the Cluster's fields and delete the Poolers (no database needed)."""
        ref = ObjectRef.of(obj)
        if cnpg.finalize(ctx, ref, spec, Status.from_stored(obj.get("status"))):
            return
        info = secret_connection(ctx, ref.namespace, spec)
        with pg.connect(info) as conn:
            for slot in replication.slots(conn, replicas.slot_prefix(ref)).values():
                replication.drop_slot(conn, slot)
                ctx.kube.event(ref, "SlotDropped", f"dropped replication slot {slot.name}")

    def forget(self, namespace: str, name: str) -> None:
        """The profile is gone: stop exporting its metrics."""
        COLLECTOR.forget(f"{namespace}/{name}")
        DRIFT_EVENTS.forget(f"{namespace}/{name}")
