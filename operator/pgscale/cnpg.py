"""The `cloudnativepg` settings method: the Cluster's parameters and instances, and Poolers.

CloudNativePG owns the server's configuration, its instances and its poolers. pgscale
writes its desired settings into the `Cluster` (server-side apply, field manager
`pgscale/<profile>`, never forced: a field another manager holds with another value stops
the change with a `ClusterFieldConflict` condition), reads back from the database what runs,
and runs PgBouncer as CloudNativePG `Pooler` resources. Deleting the profile (or leaving the
method) applies an empty configuration under the same manager, which removes exactly the
fields pgscale applied (see docs/databaseprofile.md, "The cloudnativepg method").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kubernetes.client.exceptions import ApiException

from . import conditions as cond
from .api import DATABASE_PROFILE
from .api.databaseprofile import DatabaseProfileSpec, ParameterStatus, PoolerStatus
from .api.databaseprofile import DatabaseProfileStatus as Status
from .controllers.base import Context, StatusWriter, ensure_finalizer
from .errors import DependencyError, SpecError
from .events import Event
from .kube import ObjectRef, kind_missing, status_body
from .pg import settings as pgs
from .server_settings import SettingsReport, field_of
from .specs import cnpg as specs
from .specs import pooling

log = logging.getLogger(__name__)

METHOD = "cloudnativepg"
NOT_APPLIED = "ParametersNotApplied"  # condition: settings CloudNativePG refuses, reported not sent
NOT_EFFECTIVE = "ClusterParametersPending"  # condition: in the Cluster, not yet what the server runs
CONFLICT = "ClusterFieldConflict"  # Stalled reason: another field manager holds a field with another value


def find_cluster(
    ctx: Context, namespace: str, spec: DatabaseProfileSpec, secret_labels: dict[str, str] | None
) -> str | None:
    """The CloudNativePG Cluster a profile names (clusterRef, else the Secret's cnpg.io/cluster label),
    when it exists; None when none is named, it is absent, or CloudNativePG's CRDs are not installed.
    For the `auto` resolver: a found Cluster means the cloudnativepg method."""
    name, _ = specs.cluster_name(spec, secret_labels)
    return name if name is not None and cluster_exists(ctx, namespace, name) else None


def cluster_exists(ctx: Context, namespace: str, name: str) -> bool:
    """Whether a CloudNativePG Cluster exists (False too when CloudNativePG's CRDs are not installed)."""
    try:
        return ctx.kube.read_shared(specs.API_VERSION, "Cluster", namespace, name) is not None
    except ApiException as exc:
        if kind_missing(exc):
            return False
        raise


def _cluster(ctx: Context, ref: ObjectRef, spec: DatabaseProfileSpec) -> tuple[str, str, dict[str, Any]]:
    """The named Cluster: (name, where the name came from, the object); DependencyError when it cannot be had."""
    labels = None
    if spec.settings_or_default.cluster_ref is None:
        labels = ctx.kube.secret_labels(ref.namespace, spec.connection.secret_ref.name)
    name, origin = specs.cluster_name(spec, labels)
    if name is None:
        raise DependencyError(
            "settings.method is cloudnativepg but no CloudNativePG Cluster is named: set "
            f"spec.settings.clusterRef.name, or label the connection Secret with {specs.CLUSTER_LABEL}=<cluster>",
            reason="ClusterNotFound",
        )
    try:
        live = ctx.kube.read_shared(specs.API_VERSION, "Cluster", ref.namespace, name)
    except ApiException as exc:
        if kind_missing(exc):
            raise DependencyError(
                "the Cluster kind (postgresql.cnpg.io/v1) is not installed in this cluster: install "
                "CloudNativePG, or set spec.settings.method to another method",
                reason="CloudNativePGNotInstalled",
            ) from exc
        raise
    if live is None:
        raise DependencyError(
            f"CloudNativePG Cluster {name!r} (from {origin}) not found in namespace {ref.namespace!r}: create it "
            "or fix the name",
            reason="ClusterNotFound",
        )
    return name, origin, live


@dataclass
class Outcome:
    """What a cloudnativepg reconcile of the settings did: the report the controller shows, its Events."""

    report: SettingsReport
    cluster: str
    events: list[Event] = field(default_factory=list)


def reconcile(
    ctx: Context,
    conn: psycopg.Connection,
    obj: dict[str, Any],
    spec: DatabaseProfileSpec,
    desired: dict[str, tuple[str, str]],
    status: StatusWriter,
    *,
    previous: Status,
    reason: str | None = None,
) -> Outcome:
    """Apply the desired settings (and instances) to the Cluster and report what the server runs.

    `previous` is the status as the reconcile found it (before anything of it was updated).
    `reason` is what status.settingsMethodReason says (the auto resolver's finding); by
    default, that the spec asks for this method and where the Cluster's name came from.
    """
    ref = ObjectRef.of(obj)
    name, origin, live = _cluster(ctx, ref, spec)
    events: list[Event] = []
    if previous.cluster and previous.cluster != name:  # clusterRef or the label changed: give the old one back
        events += release(ctx, ref, previous.cluster)
    send, refused = specs.split_parameters(desired)
    bad = pgs.problems(conn, send)
    if bad:  # checked against this server's pg_settings: nothing reaches the Cluster
        first = sorted(bad)[0]
        others = f" ({len(bad) - 1} more: {', '.join(sorted(bad)[1:])})" if len(bad) > 1 else ""
        raise SpecError(
            field_of(first, desired[first][1]),
            f"{first} {bad[first]}; nothing was applied to Cluster {name}{others}",
            reason="InvalidParameter",
        )
    count = specs.instances(spec)
    manager = specs.field_manager(ref.name)
    ensure_finalizer(ctx, DATABASE_PROFILE, obj, needed=True)  # before the first field: deletion gives them back
    try:
        stored = _apply(ctx, live, send, count, manager)
    except ApiException as exc:
        if exc.status == 409:
            raise conflict_error(name, live, specs.conflicts(status_body(exc)), desired) from exc
        raise
    status.update(
        Status(
            settings_method=METHOD,
            settings_method_reason=(reason or f"spec.settings.method is cloudnativepg; Cluster {name} from {origin}")[
                :512
            ],
            cluster=name,
        )
    )
    events += _changes(name, manager, live, stored, send, count)
    report, waiting = _read_back(conn, desired, send)
    status.conditions = cond.flag(
        status.conditions,
        NOT_EFFECTIVE,
        bool(waiting),
        "WaitingForCloudNativePG",
        f"in Cluster {name}, not yet what the server runs: {', '.join(waiting)}; CloudNativePG applies them when "
        "it reconciles the Cluster (check the Cluster's status and its operator if this stays)",
        status.generation,
    )
    shown = cond.get(status.conditions, NOT_APPLIED)
    hints = [n + (f" (set it in {specs.FIXED_HINTS[n]})" if n in specs.FIXED_HINTS else "") for n in refused]
    refused_message = (
        f"CloudNativePG fixes these settings and refuses them in a Cluster, so pgscale does not send them: "
        f"{'; '.join(hints)}"
    )
    status.conditions = cond.flag(
        status.conditions, NOT_APPLIED, bool(refused), "FixedByCloudNativePG", refused_message, status.generation
    )
    if refused and (shown is None or shown.message != refused_message):
        events.append(Event("ParametersNotApplied", refused_message, warning=True))
    return Outcome(report, name, events)


def _apply(ctx: Context, live: dict[str, Any], send: dict[str, str], count: int | None, manager: str) -> dict[str, Any]:
    """Apply pgscale's fields; where the API server cannot give fields back by apply (an emptied map,
    specs.empties_a_map), remove them with a JSON patch guarded by the resourceVersion read, then apply."""
    meta = live["metadata"]
    obj = specs.cluster_apply(meta["namespace"], meta["name"], send, count)
    try:
        return ctx.kube.apply_shared(obj, manager)
    except ApiException as exc:
        ops = specs.removal_ops(live, manager, set(send), count is not None)
        if exc.status != 422 or not specs.empties_a_map(status_body(exc)) or not ops:
            raise
        log.info("Cluster %s/%s: giving back %d fields by JSON patch", meta["namespace"], meta["name"], len(ops) - 1)
    ctx.kube.json_patch_shared(specs.API_VERSION, "Cluster", meta["namespace"], meta["name"], ops, manager)
    return ctx.kube.apply_shared(obj, manager)


def _read_back(
    conn: psycopg.Connection, desired: dict[str, tuple[str, str]], send: dict[str, str]
) -> tuple[SettingsReport, list[str]]:
    """The server's running values of every desired setting; and the sent ones it does not run yet
    (compared in each setting's own unit, so 256MB and 32768 pages are the same)."""
    report = SettingsReport()
    waiting = []
    names = sorted(desired)
    running = pgs.effective(conn, names)
    known = pgs.describe(conn, names)
    for name, (value, source) in sorted(desired.items()):
        entry = ParameterStatus(name=name, desired=value, source=source, applied=name in send)
        now = running.get(name)
        if now is not None:
            entry.effective = now.shown
            entry.pending_restart = now.pending_restart
        if name in send:
            if now is not None and now.pending_restart:
                report.pending_restart.append(name)
            elif now is None or not pgs.same(known.get(name), now.raw, value):
                waiting.append(name)
        report.parameters.append(entry)
    return report, waiting


def _changes(
    cluster: str,
    manager: str,
    live: dict[str, Any],
    stored: dict[str, Any],
    send: dict[str, str],
    count: int | None,
) -> list[Event]:
    """Events for what this apply changed in the Cluster, from the object before and after."""
    events = []
    old = specs.value_at(live, specs.PARAMETERS_PATH) or {}
    changed = sorted(n for n, v in send.items() if old.get(n) != v)
    if changed:
        events.append(
            Event(
                "ClusterParametersApplied",
                f"Cluster {cluster}: spec.postgresql.parameters {', '.join(changed)} (field manager {manager})",
            )
        )
    released = sorted(specs.owned_parameters(live, manager) - set(send))
    if released:
        events.append(
            Event(
                "ClusterParametersReleased",
                f"Cluster {cluster}: no longer in the spec, released: {', '.join(released)}",
            )
        )
    before, after = specs.value_at(live, specs.INSTANCES_PATH), specs.value_at(stored, specs.INSTANCES_PATH)
    if count is not None and before != after:
        events.append(Event("ClusterInstancesSet", f"Cluster {cluster}: spec.instances {before} -> {after}"))
    return events


def conflict_error(
    cluster: str, live: dict[str, Any], found: list[specs.Conflict], desired: dict[str, tuple[str, str]]
) -> SpecError:
    """A 409 as a condition: which fields, who holds them with which value, and the two ways out."""
    parts = []
    for c in found:
        parts.append(f"{c.path} = {specs.value_at(live, c.path)!r} (held by {c.manager!r})")
    first = found[0] if found else None
    if first is not None and first.parameter is not None:
        where = field_of(first.parameter, desired.get(first.parameter, ("", "parameters"))[1])
    elif first is not None and first.path == specs.INSTANCES_PATH:
        where = "readReplicas.instances"
    else:
        where = "settings"
    return SpecError(
        where,
        f"Cluster {cluster}: other field managers hold fields this profile would set, with other values: "
        f"{'; '.join(parts) or 'see the Cluster'}. pgscale never takes a field from another manager, so the Cluster "
        "was not changed. Remove these fields from what that manager applies (the Cluster's manifest), or remove "
        "them from this profile",
        reason=CONFLICT,
    )


def restart_message(names: list[str]) -> str:
    """RestartRequired's message under this method: CloudNativePG restarts the instances itself."""
    return (
        f"CloudNativePG restarts the instances to apply: {', '.join(names)} (replicas first, then the primary; with "
        "the Cluster's primaryUpdateStrategy: supervised the primary waits for a switchover)"
    )


def poolers(ctx: Context, ref: ObjectRef, spec: DatabaseProfileSpec, cluster: str, status: StatusWriter) -> list[Event]:
    """CloudNativePG Poolers `<profile>-pooler-rw` and, with read replicas, `-pooler-ro`, instead of
    pgscale's own PgBouncer; owned by the profile (the garbage collector deletes them with it)."""
    events: list[Event] = []
    previous = status.read(Status).pooler
    replicas_on = spec.read_replicas is not None and spec.read_replicas.instances > 0
    names: dict[pooling.Role, str] = {}
    applied: list[dict[str, Any]] = []
    for role in ("rw", "ro"):
        name = pooling.pooler_name(ref.name, role)
        wanted = spec.pooling is not None and (role == "rw" or (spec.pooling.read_replicas and replicas_on))
        before = previous and (previous.service if role == "rw" else previous.read_only_service)
        if not wanted:
            if before and ctx.kube.delete(specs.API_VERSION, "Pooler", ref.namespace, name):
                events.append(Event("PoolerRemoved", f"removed CloudNativePG Pooler {name}"))
            continue
        assert spec.pooling is not None
        existing = ctx.kube.read(specs.API_VERSION, "Pooler", ref.namespace, name)
        if existing is not None and not specs.owned_by(existing, ref):
            raise DependencyError(
                f"a Pooler named {name} exists and is not this profile's: pgscale does not take it over; rename or "
                "delete it, or rename the profile",
                reason="PoolerNameTaken",
            )
        _, dropped = specs.pgbouncer_parameters(spec.pooling)
        if dropped:
            raise SpecError(
                f"pooling.parameters.{dropped[0]}",
                f"CloudNativePG's Pooler does not accept {', '.join(dropped)}; remove them",
                reason="InvalidPooling",
            )
        obj = specs.pooler(ref, name, cluster, role, spec.pooling)
        ctx.kube.apply(obj)
        applied.append(obj)
        names[role] = name
        if existing is None:
            events.append(
                Event(
                    "PoolerConfigured",
                    f"CloudNativePG Pooler {name} ({role}) for Cluster {cluster}: {spec.pooling.pool_mode} pooling, "
                    f"{spec.pooling.default_pool_size} server connections per pool",
                )
            )
    if names:
        assert spec.pooling is not None
        status.update(
            Status(
                pooler=PoolerStatus(
                    service=names["rw"],
                    read_only_service=names.get("ro"),
                    instances=spec.pooling.instances,
                    config_hash=specs.spec_hash(*applied),
                )
            )
        )
    else:
        status.update(Status(pooler=None))
    return events


def release(ctx: Context, ref: ObjectRef, cluster: str) -> list[Event]:
    """Give back everything pgscale holds for a profile: its fields in the Cluster (an empty apply under
    its field manager removes the fields only it held) and its Poolers. A Cluster or a kind that is
    gone has nothing to give back."""
    events = []
    manager = specs.field_manager(ref.name)
    try:
        live = ctx.kube.read_shared(specs.API_VERSION, "Cluster", ref.namespace, cluster)
        if live is not None and (specs.owned_parameters(live, manager) or specs.owns_instances(live, manager)):
            _apply(ctx, live, {}, None, manager)
            events.append(
                Event("ClusterFieldsReleased", f"Cluster {cluster}: released the fields of field manager {manager}")
            )
    except ApiException as exc:
        if not kind_missing(exc) and exc.status != 404:
            raise
    for role in ("rw", "ro"):
        name = pooling.pooler_name(ref.name, role)
        try:
            existing = ctx.kube.read(specs.API_VERSION, "Pooler", ref.namespace, name)
        except ApiException as exc:
            if kind_missing(exc):
                break
            raise
        if existing is not None and specs.owned_by(existing, ref):
            ctx.kube.delete(specs.API_VERSION, "Pooler", ref.namespace, name)
            events.append(Event("PoolerRemoved", f"removed CloudNativePG Pooler {name}"))
    return events


def finalize(ctx: Context, ref: ObjectRef, spec: DatabaseProfileSpec, stored: Status) -> bool:
    """A deleted profile's share of the Cluster and its Poolers, given back; True when nothing is left
    for the database (no replication slots of pgscale's own replicas), so no connection is needed."""
    cluster = stored.cluster
    ours = cluster is not None or stored.settings_method == METHOD or spec.settings_or_default.method == METHOD
    if cluster is None and ours:  # status not written yet (stopped right after the first apply): ask again
        labels = None
        if spec.settings_or_default.cluster_ref is None:
            labels = ctx.kube.secret_labels(ref.namespace, spec.connection.secret_ref.name)
        cluster, _ = specs.cluster_name(spec, labels)
    if cluster is not None:
        for event in release(ctx, ref, cluster):
            ctx.kube.event(ref, event.reason, event.message, warning=event.warning)
    return ours and stored.replicas is None
