"""Cache controller: the cache server and its Secrets, the invalidation triggers and the relay.

The database side comes first: with tables to invalidate, the finalizer is added before the
outbox and triggers are created (they live outside the cluster), and every key template is
checked against its table's columns. Then the objects: a password Secret made once and never
overwritten, the config (no password in it), the server's Deployment and Service, the
application's Secret with the URL, and the relay's Deployment. Like the pooler, Ready means the
objects are applied and the triggers installed; the pods' readiness is the Deployments' own.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client.exceptions import ApiException

from .. import conditions as cond
from .. import pg
from ..api import CACHE
from ..api.cache import CacheSpec
from ..api.cache import CacheStatus as Status
from ..cache import (
    MI,
    TablePlan,
    cache_id,
    container_memory,
    function_prefix,
    human,
    maxmemory,
    new_password,
    outbox_table,
    plan_table,
    stats_table,
    trigger_name,
    truncate_trigger_name,
)
from ..checks import require_table
from ..errors import DependencyError
from ..events import Event
from ..kube import ObjectRef
from ..pg import cache as sqlc
from ..specs import cache as specs
from ..specs.alerting import API_VERSION as PROMETHEUS_API
from ..specs.pooling import config_hash
from .base import Context, Result, StatusWriter, ensure_finalizer, has_finalizer, load_profile, secret_connection

RELAY_BEHIND = "RelayBehind"
ALERTING = "AlertsFiring"
# The relay writes the server's INFO every poll interval; older figures are not evaluated.
STATS_MAX_AGE_SECONDS = 600.0
# A hit ratio over fewer reads says nothing.
MIN_READS = 1000
TRIGGER_ON = ("SELECT", "TRIGGER")  # the privileges CREATE TRIGGER and the key columns need


class CacheController:
    """Provisions the cache and keeps the database's invalidation of it in place."""

    kind = CACHE

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: CacheSpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        profile, info = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        memory = container_memory(spec, profile)
        limit = maxmemory(spec, memory)
        plans = [plan_table(rule, i) for i, rule in enumerate(spec.invalidate)]  # template syntax first
        cid = cache_id(ref.namespace, ref.name)
        events: list[Event] = []
        depth: sqlc.Depth | None = None
        stats: dict[str, float] = {}
        had_relay = status.read(Status).outbox is not None
        if plans:
            with pg.connect(info) as conn:
                plans = [
                    plan_table(rule, i, list(require_table(conn, rule.table, f"invalidate[{i}].table", TRIGGER_ON)))
                    for i, rule in enumerate(spec.invalidate)
                ]
                ensure_finalizer(ctx, self.kind, obj, needed=True)  # the outbox and triggers live in the database
                created = sqlc.install(conn, state_schema=profile.state_schema, cid=cid, plans=plans)
                events += [Event("TriggerInstalled", f"invalidation trigger installed on {t}") for t in created]
                depth = sqlc.depth(conn, profile.state_schema, cid)
                stats = sqlc.read_stats(conn, profile.state_schema, cid, STATS_MAX_AGE_SECONDS)
        elif has_finalizer(obj):  # an earlier spec installed triggers (the finalizer came first): remove them
            with pg.connect(info) as conn:
                for table in sqlc.uninstall(conn, state_schema=profile.state_schema, cid=cid):
                    events.append(Event("TriggerRemoved", f"invalidation trigger removed from {table}"))
        # Without tables to invalidate, a cache does not depend on the database at all.
        if not plans:
            ensure_finalizer(ctx, self.kind, obj, needed=False)
        password = self._password(ctx, ref)
        config = specs.server_config(spec, maxmemory_bytes=limit)
        digest = config_hash(config, password)  # a new password (its Secret deleted) restarts the server too
        ctx.kube.apply(specs.config_map(ref, config))
        ctx.kube.apply(specs.deployment(ref, spec, memory_bytes=memory, config_hash=digest))
        ctx.kube.apply(specs.service(ref))
        ctx.kube.apply(specs.app_secret(ref, password))
        if plans:
            relay = specs.relay_deployment(
                ref, spec, obj["spec"], profile, image=ctx.config.image, cid=cid, memory_bytes=memory
            )
            ctx.kube.apply(relay)
        elif had_relay:
            ctx.kube.delete("apps/v1", "Deployment", ref.namespace, specs.relay_name(ref.name))
        events += self._prometheus(ctx, ref, spec, status)
        hits, misses = stats.get("keyspace_hits", 0.0), stats.get("keyspace_misses", 0.0)
        ratio = hits / (hits + misses) if hits + misses >= MIN_READS else None
        rss = stats.get("used_memory_rss")
        status.update(
            Status(
                service=specs.server_name(ref.name),
                app_secret=specs.app_secret_name(ref.name),
                maxmemory=human(limit),
                maxmemory_bytes=limit,
                tables=[p.label for p in plans],
                outbox=f"{profile.state_schema}.{outbox_table(cid)}" if plans else None,
                outbox_depth=depth.rows if depth else None,
                config_hash=digest,
                hit_ratio=round(ratio, 4) if ratio is not None else None,
                used_memory_rss_bytes=int(rss) if rss is not None else None,
            )
        )
        events += self._relay_behind(status, depth, spec.alerts_or_default.relay_lag_seconds)
        events += self._alerts(status, spec, ratio, rss, memory)
        return Result("Provisioned", self._summary(spec, limit, plans, depth), events=events)

    @staticmethod
    def _summary(spec: CacheSpec, limit: int, plans: list[TablePlan], depth: sqlc.Depth | None) -> str:
        head = f"{human(limit)} maxmemory, {spec.maxmemory_policy}"
        if not plans:
            return f"{head}; no tables invalidate it"
        tables = ", ".join(p.label for p in plans)
        return f"{head}; invalidated by {tables}; {depth.rows if depth else 0} in the outbox"

    @staticmethod
    def _alerts(
        status: StatusWriter, spec: CacheSpec, ratio: float | None, rss: float | None, memory: int
    ) -> list[Event]:
        """Hit ratio and memory against the thresholds, from the INFO the relay last wrote."""
        alerts = spec.alerts_or_default
        firing = []
        if ratio is not None and alerts.hit_ratio_percent and ratio * 100 < alerts.hit_ratio_percent:
            message = (
                f"hit ratio below {alerts.hit_ratio_percent}% (spec.alerts.hitRatioPercent): "
                f"{ratio * 100:.1f}% since the server started"
            )
            firing.append(("HitRatio", message))
        if rss is not None and rss * 100 > memory * alerts.memory_percent:
            message = (
                f"resident memory over {alerts.memory_percent}% of {human(memory)} "
                f"({human(int(rss) // MI * MI)}): lower maxmemoryPercent or raise memory"
            )
            firing.append(("Memory", message))
        was = cond.get(status.conditions, ALERTING)
        before = was.message if was and was.status == "True" else ""
        status.conditions = cond.flag(
            status.conditions,
            ALERTING,
            bool(firing),
            "ThresholdsExceeded",
            "; ".join(m for _, m in firing),
            status.generation,
        )
        # An Event when an alert starts firing, not on every reconcile while it does (its figure changes).
        return [Event(f"Alert{name}", m, warning=True) for name, m in firing if m[: m.index("%")] not in before]

    def _prometheus(self, ctx: Context, ref: ObjectRef, spec: CacheSpec, status: StatusWriter) -> list[Event]:
        """The PrometheusRule and the relay's PodMonitor, when asked for (deleted when no longer)."""
        events: list[Event] = []
        rule = spec.alerts_or_default.prometheus_rule_or_default
        monitor = spec.pod_monitor_or_default
        wanted: list[tuple[str, str, dict[str, Any] | None]] = [
            (
                "PrometheusRule",
                specs.rule_name(ref),
                specs.prometheus_rule(ref, spec.alerts_or_default, rule.labels) if rule.enabled else None,
            ),
            (
                "PodMonitor",
                specs.relay_name(ref.name),
                specs.pod_monitor(ref, monitor.labels) if monitor.enabled and spec.invalidate else None,
            ),
        ]
        for kind, name, obj in wanted:
            if obj is None:
                if kind == "PrometheusRule" and status.read(Status).prometheus_rule:
                    ctx.kube.delete(PROMETHEUS_API, kind, ref.namespace, name)
                    status.update(Status(prometheus_rule=None))
                elif kind == "PodMonitor" and spec.pod_monitor is not None:
                    ctx.kube.delete(PROMETHEUS_API, kind, ref.namespace, name)
                continue
            try:
                ctx.kube.apply(obj)
            except ApiException as exc:
                if exc.status == 404:
                    field = "alerts.prometheusRule" if kind == "PrometheusRule" else "podMonitor"
                    raise DependencyError(
                        f"the {kind} kind (monitoring.coreos.com/v1) is not installed in this cluster: install "
                        f"prometheus-operator's CRDs, or set spec.{field}.enabled: false",
                        reason=f"{kind}CRDMissing",
                    ) from exc
                raise
            if kind == "PrometheusRule" and status.read(Status).prometheus_rule != name:
                status.update(Status(prometheus_rule=name))
                events.append(Event("PrometheusRuleApplied", f"alert rules in PrometheusRule {name}"))
        return events

    @staticmethod
    def _relay_behind(status: StatusWriter, depth: sqlc.Depth | None, threshold: int) -> list[Event]:
        behind = depth is not None and (depth.oldest_seconds or 0.0) > threshold
        was = cond.is_true(status.conditions, RELAY_BEHIND)
        message = ""
        if behind and depth is not None:
            message = (
                f"{depth.rows} invalidations wait in the outbox, the oldest for {depth.oldest_seconds:.0f}s: "
                "the relay is down or cannot keep up (see its Deployment's pods); cached values may be stale"
            )
        status.conditions = cond.flag(
            status.conditions, RELAY_BEHIND, behind, "OutboxNotDrained", message, status.generation
        )
        return [Event(RELAY_BEHIND, message, warning=True)] if behind and not was else []

    @staticmethod
    def _password(ctx: Context, ref: ObjectRef) -> str:
        """The password Secret's, or a new one in a Secret made now: never overwritten, so a client
        configured once keeps working."""
        name = specs.auth_secret_name(ref.name)
        current = ctx.kube.read_secret(ref.namespace, name)
        password = (current or {}).get(specs.PASSWORD_KEY, "")
        if password.isalnum():
            return password
        password = new_password()
        ctx.kube.apply(specs.auth_secret(ref, password))
        return password

    def finalize(self, ctx: Context, obj: dict[str, Any], spec: CacheSpec) -> None:
        """Drop the triggers, their functions and the outbox: the tables must not keep writing for a
        cache that is gone."""
        ref = ObjectRef.of(obj)
        profile, _ = load_profile(ctx, ref.namespace, spec.profile_ref.name)
        info = secret_connection(ctx, ref.namespace, profile)
        with pg.connect(info) as conn:
            cid = cache_id(ref.namespace, ref.name)
            for table in sqlc.uninstall(conn, state_schema=profile.state_schema, cid=cid):
                ctx.kube.event(ref, "TriggerRemoved", f"invalidation trigger removed from {table}")

    def left_behind(self, obj: dict[str, Any], spec: CacheSpec) -> str:
        """What a Cache whose profile or Secret is gone could not drop, and how to drop it."""
        ref = ObjectRef.of(obj)
        cid = cache_id(ref.namespace, ref.name)
        tables = ", ".join(r.table.qualified() for r in spec.invalidate)
        row, truncate = trigger_name(cid), truncate_trigger_name(cid)
        return (
            f"its invalidation triggers {row} and {truncate} on {tables}, their functions {function_prefix(cid)}* "
            f"and the tables {outbox_table(cid)} and {stats_table(cid)} in the profile's state schema. Drop them "
            f"there: DROP TRIGGER {row} ON <table>; DROP TRIGGER {truncate} ON <table>; DROP FUNCTION "
            f"<stateSchema>.<function>(); DROP TABLE <stateSchema>.{outbox_table(cid)}, "
            f"<stateSchema>.{stats_table(cid)};"
        )
