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

from .. import conditions as cond
from .. import pg
from ..api import CACHE
from ..api.cache import CacheSpec
from ..api.cache import CacheStatus as Status
from ..cache import (
    TablePlan,
    cache_id,
    container_memory,
    function_prefix,
    human,
    maxmemory,
    new_password,
    outbox_table,
    plan_table,
    trigger_name,
)
from ..checks import require_table
from ..events import Event
from ..kube import ObjectRef
from ..pg import cache as sqlc
from ..specs import cache as specs
from ..specs.pooling import config_hash
from .base import Context, Result, StatusWriter, ensure_finalizer, load_profile, secret_connection

RELAY_BEHIND = "RelayBehind"
# An outbox row older than this means the relay is down or cannot keep up: keys stay stale that long.
RELAY_BEHIND_SECONDS = 60.0


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
        with pg.connect(info) as conn:
            if plans:
                plans = [
                    plan_table(
                        rule,
                        i,
                        list(
                            require_table(conn, rule.table, f"invalidate[{i}].table", privileges=("SELECT", "TRIGGER"))
                        ),
                    )
                    for i, rule in enumerate(spec.invalidate)
                ]
                ensure_finalizer(ctx, self.kind, obj, needed=True)  # the outbox and triggers live in the database
                created = sqlc.install(conn, state_schema=profile.state_schema, cid=cid, plans=plans)
                events += [Event("TriggerInstalled", f"invalidation trigger installed on {t}") for t in created]
                depth = sqlc.depth(conn, profile.state_schema, cid)
            elif sqlc.installed(conn, cid) or sqlc.outbox_exists(conn, profile.state_schema, cid):
                for table in sqlc.uninstall(conn, state_schema=profile.state_schema, cid=cid):
                    events.append(Event("TriggerRemoved", f"invalidation trigger removed from {table}"))
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
            relay = specs.relay_deployment(ref, spec, obj["spec"], profile, image=ctx.config.image, cid=cid)
            ctx.kube.apply(relay)
        else:
            ctx.kube.delete("apps/v1", "Deployment", ref.namespace, specs.relay_name(ref.name))
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
            )
        )
        events += self._relay_behind(status, depth)
        return Result("Ready", self._summary(spec, limit, plans, depth), events=events)

    @staticmethod
    def _summary(spec: CacheSpec, limit: int, plans: list[TablePlan], depth: sqlc.Depth | None) -> str:
        head = f"{human(limit)} maxmemory, {spec.maxmemory_policy}"
        if not plans:
            return f"{head}; no tables invalidate it"
        tables = ", ".join(p.label for p in plans)
        return f"{head}; invalidated by {tables}; {depth.rows if depth else 0} in the outbox"

    @staticmethod
    def _relay_behind(status: StatusWriter, depth: sqlc.Depth | None) -> list[Event]:
        behind = depth is not None and (depth.oldest_seconds or 0.0) > RELAY_BEHIND_SECONDS
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
        return (
            f"its invalidation triggers {trigger_name(cid)} on {tables}, "
            f"their functions {function_prefix(cid)}* and the outbox table {outbox_table(cid)} in the profile's state "
            f"schema. Drop them there: DROP TRIGGER {trigger_name(cid)} ON <table>; DROP FUNCTION <function>(); "
            f"DROP TABLE <stateSchema>.{outbox_table(cid)};"
        )
