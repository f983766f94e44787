"""`pgscale status`: every DatabaseProfile with the policies that use it, in one view.

`kubectl get pgscale` lists the six kinds side by side; what a person running a
database wants is the other way round: per database, what works on it and how far
it got. Reading (:func:`load`) is kept apart from formatting (:func:`build`,
:func:`render_text`, :func:`render_json`), which is pure and unit-tested on objects
as the API server returns them; the reads run against a real API server in the e2e
tests. A status is read through its kind's status model (:func:`parse`, leniently:
``BaseStatus.from_stored``), the one the controllers write it with, so a renamed field
fails the type check and the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # the models are imported where they are used: `pgscale --help` stays light
    from .api.cache import CacheStatus
    from .api.common import BaseStatus, Condition
    from .api.databaseprofile import DatabaseProfileStatus
    from .api.databasesplit import DatabaseSplitStatus
    from .api.filemigration import FileMigrationStatus
    from .api.partitionpolicy import ConversionStep, PartitionPolicyStatus
    from .api.retentionpolicy import RetentionPolicyStatus

Obj = dict[str, Any]
# (namespace, Secret name) -> its data; None when it does not exist; absent when it could not be read.
Secrets = Mapping[tuple[str, str], dict[str, str] | None]

PROFILE_KIND = "DatabaseProfile"
CHILD_KINDS = ("PartitionPolicy", "RetentionPolicy", "FileMigration", "Cache")
PLURALS = {
    "DatabaseProfile": "databaseprofiles",
    "PartitionPolicy": "partitionpolicies",
    "RetentionPolicy": "retentionpolicies",
    "FileMigration": "filemigrations",
    "Cache": "caches",
}
KSTATUS_CONDITIONS = ("Ready", "Reconciling", "Stalled")
# status.conversion.step once no conversion is under way (it stays in status after the switch).
CONVERSION_OVER: tuple[ConversionStep, ...] = ("done", "none")


# --- reading an object through its kind's models -----------------------------------------


@dataclass(frozen=True)
class Resource:
    """One object as the view reads it: metadata and spec as stored, status parsed by its kind's model."""

    kind: str
    meta: Obj
    spec: Obj
    status: BaseStatus


def parse(obj: Obj) -> Resource:
    """An object from the API server, its status typed."""
    from .api import KINDS
    from .api.common import BaseStatus

    kind = str(obj.get("kind", "?"))
    model = next((k.status for k in KINDS if k.name == kind), BaseStatus)
    return Resource(kind, obj.get("metadata") or {}, obj.get("spec") or {}, model.from_stored(obj.get("status")))


# --- health -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """Where a resource stands, in kstatus's words (plus Suspended), and why."""

    state: str  # Current, InProgress, Failed, Suspended, Terminating
    reason: str
    message: str


def condition(status: BaseStatus, ctype: str) -> Condition | None:
    """A condition of the status, or None."""
    return next((c for c in status.conditions if c.type == ctype), None)


def _true(status: BaseStatus, ctype: str) -> Condition | None:
    found = condition(status, ctype)
    return found if found is not None and found.status == "True" else None


def health(res: Resource) -> Health:
    """kstatus's rules: an unobserved generation is InProgress, Stalled Failed, Reconciling InProgress,
    Ready Current; a suspended resource that is not failing shows as Suspended."""
    meta, status = res.meta, res.status
    if meta.get("deletionTimestamp"):
        return Health("Terminating", "Deleting", "waiting for finalizers: " + ", ".join(meta.get("finalizers") or []))
    observed, generation = status.observed_generation, meta.get("generation")
    if observed is None:
        return Health("InProgress", "NotObserved", "the operator has not reported on this resource yet")
    if generation is not None and observed != generation:
        return Health(
            "InProgress", "NotObserved", f"generation {generation} not observed yet (status is of {observed})"
        )
    stalled = _true(status, "Stalled")
    if stalled is not None:
        return Health("Failed", stalled.reason, stalled.message)
    ready = condition(status, "Ready")
    if res.spec.get("suspend") is True:
        return Health("Suspended", "Suspended", (ready.message if ready else "") or "spec.suspend is true")
    reconciling = _true(status, "Reconciling")
    if reconciling is not None:
        return Health("InProgress", reconciling.reason, reconciling.message)
    if ready is None:
        return Health("InProgress", "NoReadyCondition", "no Ready condition yet")
    return Health("Current" if ready.status == "True" else "InProgress", ready.reason, ready.message)


# --- humane numbers ---------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    """1536 -> 1.5 KiB: binary units, as Kubernetes quantities use."""
    if n is None:
        return "-"
    value, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """46 -> 46s, 320 -> 5m20s, 7500 -> 2h5m: the two largest units, like kubectl's ages."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    for size, unit, sub, subunit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s")):
        if s >= size:
            rest = (s % size) // sub
            return f"{s // size}{unit}{rest}{subunit}" if rest else f"{s // size}{unit}"
    return f"{s}s"


def human_count(n: float | None) -> str:
    """Thousands separated, so row counts read at a glance."""
    return "-" if n is None else f"{n:,.0f}"


def human_rate(per_second: float | None, unit: str) -> str:
    """A rate with precision where it matters (0.5 rows/s, 1,234 rows/s)."""
    if per_second is None:
        return "-"
    return f"{per_second:,.1f} {unit}/s" if per_second < 100 else f"{per_second:,.0f} {unit}/s"


def number(value: float) -> str:
    """A number as the API server returns it: 80, 91.5 (a whole float comes back without its .0)."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _percent(done: float | None, total: float | None) -> str | None:
    if done is None or not total:
        return None
    return f"{100.0 * done / total:.1f}%"


def _join(*parts: str | None, sep: str = ", ") -> str:
    return sep.join(p for p in parts if p)


def _age(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return "-"
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "-"
    return human_duration((now - then).total_seconds())


# --- progress per kind ------------------------------------------------------------------


def profile_progress(status: DatabaseProfileStatus) -> str:
    """The server and its size: what a profile row says in one cell."""
    version = status.server_version
    size = status.capacity.database_size if status.capacity else None
    return _join(f"PostgreSQL {version}" if version else None, size) or "-"


def partition_progress(status: PartitionPolicyStatus, wide: bool = False) -> str:
    """Conversion while it runs, then the partitions and (wide) the last maintenance."""
    conv = status.conversion
    if conv is not None and conv.step not in CONVERSION_OVER:
        done, total = conv.rows_done, conv.rows_total
        rows = f"{human_count(done)}/{human_count(total)} rows" if total is not None else f"{human_count(done)} rows"
        lock = conv.longest_lock_ms
        text = _join(
            f"converting: {conv.step}" if conv.step else "converting",
            _percent(done, total),
            rows if done is not None else None,
            human_rate(conv.rows_per_second, "rows") if conv.rows_per_second is not None else None,
            f"ETA {human_duration(conv.eta_seconds)}" if conv.eta_seconds is not None else None,
            f"longest lock {lock} ms" if wide and lock is not None else None,
        )
    elif status.partitioned is True:
        count = status.partition_count
        text = f"{count} partitions" if count is not None else "partitioned"
    elif status.partitioned is False:
        text = "not partitioned"
    else:
        text = "-"
    if wide:
        if conv is not None and conv.step == "done" and conv.rows_done is not None:
            text += f"; converted with {human_count(conv.rows_done)} rows"
        last = status.last_maintenance
        if last is not None:
            changes = (
                _join(
                    f"created {len(last.created)}" if last.created else None,
                    f"detached {len(last.detached)}" if last.detached else None,
                    f"dropped {len(last.dropped)}" if last.dropped else None,
                    f"{human_count(last.rows_moved_from_default)} rows moved from DEFAULT"
                    if last.rows_moved_from_default
                    else None,
                )
                or "no changes"
            )
            text += f"; last maintenance {last.time}: {changes}"
        if status.next_maintenance_time:
            text += f"; next {status.next_maintenance_time}"
    return text


def retention_progress(status: RetentionPolicyStatus, wide: bool = False) -> str:
    """The current or last run: rows, rate, ETA; (wide) next run and totals."""
    run = status.last_run
    if run is None:
        text = "no run yet"
    elif run.outcome == "Running":
        done, total = run.rows_archived + run.rows_deleted, run.rows_total
        text = _join(
            "running",
            _percent(done, total),
            f"{human_count(done)}/{human_count(total)} rows" if total is not None else f"{human_count(done)} rows",
            human_rate(run.rows_per_second, "rows") if run.rows_per_second is not None else None,
            f"ETA {human_duration(run.eta_seconds)}" if run.eta_seconds is not None else None,
        )
    elif run.outcome == "DryRun":
        text = f"last run DryRun: {human_count(run.rows_matched or 0)} rows would move"
    else:
        moved = (
            _join(
                f"{human_count(run.rows_archived)} archived" if run.rows_archived else None,
                f"{human_count(run.rows_deleted)} deleted" if run.rows_deleted else None,
            )
            or "0 rows"
        )
        text = _join(
            f"last run {run.outcome or 'unknown'}: {moved}",
            f"in {human_duration(run.duration_seconds)}" if run.duration_seconds is not None else None,
            human_rate(run.rows_per_second, "rows") if run.rows_per_second is not None else None,
            sep=" ",
        )
    if wide:
        if status.next_run_time:
            text += f"; next {status.next_run_time}"
        totals = status.totals
        if totals is not None:
            text += (
                f"; total {human_count(totals.runs)} runs, {human_count(totals.rows_archived)} "
                f"archived, {human_count(totals.rows_deleted)} deleted"
            )
    exported = status.export
    if exported is not None and exported.files:
        text += (
            f"; exported {human_count(exported.rows)} rows in {human_count(exported.files)} files "
            f"({human_bytes(exported.bytes)}, {human_bytes(exported.database_bytes_freed)} freed in the database)"
        )
        if wide and exported.oldest and exported.newest:
            text += f", {exported.oldest} to {exported.newest}"
    return text


def files_progress(status: FileMigrationStatus, wide: bool = False) -> str:
    """Phase, share done, rates and ETA; (wide) bytes, reclaimable space, the Job."""
    phase = status.phase
    if not phase:
        return "-"
    total, migrated = status.rows_total, status.rows_migrated
    counts = None
    if total is not None:
        counts = f"{human_count(migrated or 0)}/{human_count(total)} rows"
        if status.rows_failed:
            counts += f", {human_count(status.rows_failed)} failed"
    running = phase != "Completed"
    text = _join(f"{phase} {status.progress}" if status.progress else phase, f"({counts})" if counts else None, sep=" ")
    text = _join(
        text,
        human_rate(status.rows_per_second, "rows") if running and status.rows_per_second else None,
        f"{human_bytes(status.bytes_per_second)}/s" if running and status.bytes_per_second else None,
        f"ETA {human_duration(status.eta_seconds)}" if status.eta_seconds is not None else None,
    )
    if wide:
        text = _join(
            text,
            f"{human_bytes(status.bytes_migrated)} written" if status.bytes_migrated is not None else None,
            f"{human_bytes(status.reclaimable_bytes)} reclaimable" if status.reclaimable_bytes else None,
            f"Job {status.job_name}" if status.job_name else None,
        )
    return text


def split_progress(status: DatabaseSplitStatus, wide: bool = False) -> str:
    """Phase, where writes go, tables ready, lag, copy ETA, the longest write block; (wide) the Secret."""
    if not status.phase:
        return "-"
    ready = sum(1 for t in status.tables if t.state == "ready")
    text = _join(
        f"{status.phase} (writes to {status.writes_to or 'source'})",
        f"{ready}/{len(status.tables)} tables ready" if status.tables else None,
        f"lag {human_bytes(status.lag_bytes)}" if status.lag_bytes is not None else None,
        f"ETA {human_duration(status.copy_eta_seconds)}" if status.copy_eta_seconds is not None else None,
        f"longest write block {status.longest_write_block_ms} ms"
        if status.longest_write_block_ms is not None
        else None,
    )
    if wide and status.connection_secret:
        text = _join(text, f"Secret {status.connection_secret}")
    return text


def cache_progress(status: CacheStatus, wide: bool = False) -> str:
    """maxmemory, the tables that invalidate it, the outbox; (wide) the Service and Secret."""
    if not status.maxmemory:
        return "-"
    tables = f"{len(status.tables)} table{'s' if len(status.tables) != 1 else ''}" if status.tables else None
    outbox = f"outbox {human_count(status.outbox_depth)}" if status.outbox_depth is not None else None
    text = _join(f"{status.maxmemory} maxmemory", tables, outbox)
    if wide:
        service = f"Service {status.service}" if status.service else None
        text = _join(text, service, f"Secret {status.app_secret}" if status.app_secret else None)
    return text


def progress(res: Resource, wide: bool = False) -> str:
    """The progress cell of any pgscale kind."""
    from .api.cache import CacheStatus
    from .api.databaseprofile import DatabaseProfileStatus
    from .api.databasesplit import DatabaseSplitStatus
    from .api.filemigration import FileMigrationStatus
    from .api.partitionpolicy import PartitionPolicyStatus
    from .api.retentionpolicy import RetentionPolicyStatus

    status = res.status
    if isinstance(status, DatabaseProfileStatus):
        return profile_progress(status)
    if isinstance(status, PartitionPolicyStatus):
        return partition_progress(status, wide)
    if isinstance(status, RetentionPolicyStatus):
        return retention_progress(status, wide)
    if isinstance(status, FileMigrationStatus):
        return files_progress(status, wide)
    if isinstance(status, DatabaseSplitStatus):
        return split_progress(status, wide)
    if isinstance(status, CacheStatus):
        return cache_progress(status, wide)
    return "-"


# --- a profile's summary ----------------------------------------------------------------


def database(profile: Resource, secrets: Secrets) -> str:
    """user@host:port/dbname the profile points at (never the password), or what is known without the Secret."""
    from .api.databaseprofile import ConnectionSpec
    from .errors import ReconcileError
    from .pg.connection import resolve

    raw = profile.spec.get("connection") or {}
    secret_name = (raw.get("secretRef") or {}).get("name", "?")
    overrides = _join(*(f"{k} {raw[k]}" for k in ("host", "port", "dbname") if raw.get(k) is not None))
    key = (profile.meta.get("namespace", ""), secret_name)
    if key not in secrets:
        return _join(f"through Secret {secret_name} (not readable)", overrides)
    secret = secrets[key]
    if secret is None:
        return _join(f"Secret {secret_name} not found", overrides)
    try:
        info = resolve(ConnectionSpec.model_validate(raw), secret, secret_name)
    except (ReconcileError, ValueError) as exc:
        return f"Secret {secret_name}: {exc}"
    return f"{info.describe()} (Secret {secret_name})"


def profile_summary(spec: Obj, status: DatabaseProfileStatus) -> list[tuple[str, str]]:
    """(label, text) lines under a profile's heading: settings, pooler, replicas, capacity, alerts."""
    from .api.common import default_of
    from .api.databaseprofile import PoolingSpec, ReadReplicasSpec

    params, pending = status.parameters, status.pending_restart
    sources = sorted({p.source for p in params})
    settings = f"{len(params)} managed" + (f" (from {', '.join(sources)})" if sources else "")
    settings += f", {len(pending)} pending restart: {', '.join(pending)}" if pending else ", none pending restart"
    if spec.get("tier"):
        settings = f"tier {spec['tier']}, {settings}"

    pooler = status.pooler
    if pooler is not None:
        mode = default_of(PoolingSpec, "pool_mode")
        pooling = f"{pooler.service} ({pooler.instances} instances"
        pooling += f", pool mode {spec['pooling'].get('poolMode', mode)}" if spec.get("pooling") else ""
        pooling += f"), read-only {pooler.read_only_service}" if pooler.read_only_service else ")"
    else:
        pooling = "requested, not running yet" if spec.get("pooling") else "off"

    replicas_spec = spec.get("readReplicas")
    want = replicas_spec.get("instances", default_of(ReadReplicasSpec, "instances")) if replicas_spec else 0
    replicas_status = status.replicas or []
    if want or replicas_status:
        active = sum(1 for r in replicas_status if r.active)
        lag_b = [r.lag_bytes for r in replicas_status if r.lag_bytes is not None]
        lag_s = [r.lag_seconds for r in replicas_status if r.lag_seconds is not None]
        replicas = f"{active}/{want} streaming"
        if lag_b or lag_s:
            replicas += f", max lag {human_bytes(max(lag_b)) if lag_b else '-'}"
            replicas += f" / {max(lag_s):.1f}s" if lag_s else ""
    else:
        replicas = "none"

    cap = status.capacity
    if cap is not None and cap.database_bytes is not None:
        growth, months = cap.growth_bytes_per_month, cap.horizon_months
        capacity = _join(
            cap.database_size or human_bytes(cap.database_bytes),
            f"growing {human_bytes(growth)}/month" if growth is not None else "growth known after a day of samples",
            f"{human_bytes(cap.projected_bytes)} in {months if months is not None else '?'} months"
            if cap.projected_bytes is not None
            else None,
            f"tier {cap.recommended_tier} advised" if cap.recommended_tier else None,
        )
    else:
        capacity = "no sample yet"

    alerts = status.alerts
    alerting = ", ".join(f"{a.name} {number(a.value)} > {number(a.threshold)} since {a.since}" for a in alerts)
    lines = [("settings", settings), ("pooler", pooling), ("replicas", replicas), ("capacity", capacity)]
    lines.append(("alerts", alerting or "none"))
    if status.prometheus_rule:
        lines.append(("rules", f"PrometheusRule {status.prometheus_rule}"))
    return lines


# --- the view ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One resource in a profile's table."""

    kind: str
    name: str
    ready: str
    state: str
    reason: str
    message: str
    progress: str
    table: str
    generation: str
    age: str
    conditions: list[Condition] = field(default_factory=list)


@dataclass(frozen=True)
class ProfileView:
    """A DatabaseProfile (or a missing one that resources point at) and what uses it."""

    namespace: str
    name: str
    found: bool
    database: str
    summary: list[tuple[str, str]]
    rows: list[Row]


def row(res: Resource, now: datetime, wide: bool = False) -> Row:
    """One resource as a table row."""
    from .api.common import TableReference, default_of

    meta, status = res.meta, res.status
    h = health(res)
    ready = condition(status, "Ready")
    table = res.spec.get("table") or {}
    schema = table.get("schema", default_of(TableReference, "schema_"))
    observed = status.observed_generation
    return Row(
        kind=res.kind,
        name=str(meta.get("name", "?")),
        ready=ready.status if ready else "-",
        state=h.state,
        reason=h.reason or "-",
        message=h.message,
        progress=progress(res, wide),
        table=f"{schema}.{table['name']}" if table.get("name") else "-",
        generation=f"{observed if observed is not None else '-'}/{meta.get('generation', '-')}",
        age=_age(meta.get("creationTimestamp"), now),
        conditions=list(status.conditions),
    )


def _sort_key(res: Resource) -> tuple[int, str]:
    order = CHILD_KINDS.index(res.kind) if res.kind in CHILD_KINDS else len(CHILD_KINDS)
    return order, res.meta.get("name", "")


def build(
    profiles: list[Obj],
    children: list[Obj],
    secrets: Secrets,
    *,
    now: datetime,
    only: str | None = None,
    wide: bool = False,
) -> list[ProfileView]:
    """Group resources under the profile their spec.profileRef names; a missing profile gets a heading too."""
    from .api.databaseprofile import DatabaseProfileStatus

    by_key: dict[tuple[str, str], Resource | None] = {}
    for p in map(parse, profiles):
        by_key[(p.meta.get("namespace", ""), p.meta.get("name", ""))] = p
    uses: dict[tuple[str, str], list[Resource]] = {}
    for c in map(parse, children):
        key = (c.meta.get("namespace", ""), (c.spec.get("profileRef") or {}).get("name", ""))
        uses.setdefault(key, []).append(c)
        by_key.setdefault(key, None)
    views = []
    for key in sorted(by_key):
        if only is not None and key[1] != only:
            continue
        profile = by_key[key]
        rows = [row(profile, now, wide)] if profile else []
        rows += [row(c, now, wide) for c in sorted(uses.get(key, []), key=_sort_key)]
        if profile is None:
            n = len(uses.get(key, []))
            what = f"not found; {n} resource{'s' if n != 1 else ''} point{'s' if n == 1 else ''} at it"
            views.append(ProfileView(key[0], key[1], False, what, [], rows))
        else:
            status = profile.status
            summary = profile_summary(profile.spec, status) if isinstance(status, DatabaseProfileStatus) else []
            views.append(ProfileView(key[0], key[1], True, database(profile, secrets), summary, rows))
    return views


def _other_conditions(conditions: list[Condition]) -> str:
    extra = [f"{c.type}={c.status}" for c in conditions if c.type not in KSTATUS_CONDITIONS]
    return ",".join(extra) or "-"


def table(headers: list[str], rows: list[list[str]], indent: str = "") -> str:
    """Columns padded to their widest cell, two spaces apart, like kubectl get; the last one unpadded."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for r in [headers, *rows]:
        cells = [cell.ljust(widths[i]) if i < len(r) - 1 else cell for i, cell in enumerate(r)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines) + "\n"


def render_text(views: list[ProfileView], wide: bool = False) -> str:
    """One block per profile: its heading and summary, then a table of it and its policies."""
    blocks = []
    for view in views:
        version = next((r.progress for r in view.rows if r.kind == PROFILE_KIND), "")
        head = f"DatabaseProfile {view.namespace}/{view.name}: {view.database}"
        if view.found and version.startswith("PostgreSQL"):
            head += f", {version.split(',')[0]}"
        lines = [head + "\n"]
        width = max((len(label) for label, _ in view.summary), default=0)
        lines += [f"  {label.ljust(width)}  {text}\n" for label, text in view.summary]
        headers = ["KIND", "NAME", "READY", "STATE", "REASON", "PROGRESS"]
        if wide:
            headers += ["TABLE", "GEN", "CONDITIONS", "AGE"]
        headers.append("MESSAGE")
        cells = []
        for r in view.rows:
            line = [r.kind, r.name, r.ready, r.state, r.reason, r.progress]
            if wide:
                line += [r.table, r.generation, _other_conditions(r.conditions), r.age]
            line.append(" ".join(r.message.split()) or "-")
            cells.append(line)
        lines.append("\n" + table(headers, cells, indent="  "))
        blocks.append("".join(lines))
    return "\n".join(blocks)


def render_json(views: list[ProfileView]) -> str:
    """The view as JSON, for scripts: the same grouping, states and progress as the table."""
    out = []
    for view in views:
        data = asdict(view)
        data["summary"] = dict(view.summary)
        for cells, r in zip(data["rows"], view.rows, strict=True):
            cells["conditions"] = [c.wire() for c in r.conditions]  # as the API server has them
        out.append(data)
    return json.dumps({"profiles": out}, indent=2) + "\n"


# --- reading from the API server --------------------------------------------------------


@dataclass
class Listing:
    """Everything the view needs, as read from the API server."""

    profiles: list[Obj]
    children: list[Obj]
    secrets: dict[tuple[str, str], dict[str, str] | None]


def current_namespace(context: str | None = None, kubeconfig: str | None = None) -> str:
    """The namespace kubectl would use: the pod's own, or the kubeconfig context's, else default."""
    sa = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(sa):
        with open(sa) as f:
            return f.read().strip()
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
    return str((chosen or {}).get("context", {}).get("namespace") or "default")


def load(namespace: str | None, only: str | None = None) -> Listing:
    """The six kinds in one namespace (or all), and the Secrets of the profiles shown.

    A Secret that cannot be read (RBAC) is left out: the view then names it instead of
    the database it points at.
    """
    from kubernetes.client.exceptions import ApiException

    from .api import GROUP, VERSION
    from .kube import Kube

    kube = Kube()

    def items(plural: str) -> list[Obj]:
        if namespace is None:
            result = kube.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        else:
            result = kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        return list(cast("Obj", result).get("items", []))

    profiles = items(PLURALS[PROFILE_KIND])
    children = [obj for kind in CHILD_KINDS for obj in items(PLURALS[kind])]
    secrets: dict[tuple[str, str], dict[str, str] | None] = {}
    for p in profiles:
        ns, name = p["metadata"]["namespace"], p["metadata"]["name"]
        secret = ((p.get("spec") or {}).get("connection") or {}).get("secretRef", {}).get("name")
        if not secret or (only is not None and name != only):
            continue
        try:
            secrets[(ns, secret)] = kube.read_secret(ns, secret)
        except (ApiException, UnicodeDecodeError):
            continue  # forbidden, or not text: shown as "not readable"
    return Listing(profiles, children, secrets)


def api_error(exc: Exception) -> str:
    """The API server's own message (it names the verb, resource and user), else the HTTP status."""
    body = getattr(exc, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    return str(message or f"{getattr(exc, 'status', '')} {getattr(exc, 'reason', exc)}".strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`pgscale status` options, kubectl's names where kubectl has them."""
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="namespace to show (default: the kubeconfig context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="show every namespace")
    p.add_argument("-o", "--output", choices=["text", "wide", "json"], default="text", help="output format")
    p.add_argument("--context", help="kubeconfig context to use")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("profile", nargs="?", help="show only this DatabaseProfile (and what points at it)")


def main(args: argparse.Namespace) -> int:
    """Read, build, print; exit 1 when a named profile is nowhere to be found."""
    from kubernetes import config
    from kubernetes.client.exceptions import ApiException

    from .kube import load_config
    from .redact import redact

    try:
        if args.context or args.kubeconfig:
            config.load_kube_config(config_file=args.kubeconfig, context=args.context)  # type: ignore[no-untyped-call]
        else:
            load_config()
        namespace = (
            None if args.all_namespaces else (args.namespace or current_namespace(args.context, args.kubeconfig))
        )
    except config.ConfigException as exc:  # no kubeconfig, or no such context
        print(f"pgscale status: {exc}", file=sys.stderr)
        return 1
    try:
        listing = load(namespace, args.profile)
    except ApiException as exc:  # forbidden, CRDs not installed: say so in one line, as kubectl does
        print(f"pgscale status: {api_error(exc)}", file=sys.stderr)
        return 1
    views = build(
        listing.profiles,
        listing.children,
        listing.secrets,
        now=datetime.now(UTC),
        only=args.profile,
        wide=args.output == "wide",
    )
    where = "any namespace" if namespace is None else f"namespace {namespace}"
    if not views:
        if args.profile:
            print(f"DatabaseProfile {args.profile!r} not found in {where}", file=sys.stderr)
            return 1
        if args.output != "json":
            print(f"No pgscale resources found in {where}.", file=sys.stderr)
    if args.output == "json":
        sys.stdout.write(redact(render_json(views)))
    else:
        sys.stdout.write(redact(render_text(views, wide=args.output == "wide")))
    return 0
