"""What every controller shares: the context, the result, the status writer and the
reconcile scaffold that turns outcomes and errors into conditions and Events.

A controller's ``reconcile`` only parses, plans, acts and fills in status fields;
the scaffold owns observedGeneration, the Ready/Reconciling/Stalled conditions,
Events on transitions, metrics, and never lets an exception escape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import psycopg
import urllib3
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from .. import conditions as cond
from ..api import DATABASE_PROFILE, Kind
from ..api.common import BaseStatus, Condition, TableReference, default_of, wire_name
from ..api.databaseprofile import DatabaseProfileSpec
from ..api.filemigration import Destination
from ..errors import DependencyError, ReconcileError, SpecError
from ..events import Event
from ..kube import Kube, ObjectRef, api_error
from ..metrics import METRICS
from ..pg import classify
from ..pg.connection import ConnInfo, resolve

log = logging.getLogger(__name__)

SpecT = TypeVar("SpecT", bound=BaseModel, contravariant=True)
StatusT = TypeVar("StatusT", bound=BaseStatus)


@dataclass
class OperatorConfig:
    """How this operator process runs (images, resync, namespaces), from flags and environment."""

    image: str = field(default_factory=lambda: os.environ.get("PGSCALE_IMAGE", "pgscale:0.1.0"))
    pgbouncer_image: str = field(
        default_factory=lambda: os.environ.get("PGSCALE_PGBOUNCER_IMAGE", "pgbouncer/pgbouncer:1.24.1")
    )
    postgres_image: str = field(default_factory=lambda: os.environ.get("PGSCALE_POSTGRES_IMAGE", "postgres:15"))
    resync_seconds: float = 300.0
    # The namespaces the operator watches; empty: every namespace.
    namespaces: list[str] = field(default_factory=list)
    # How soon a Stalled resource is looked at again (its dependency may have appeared).
    stalled_retry_seconds: float = field(
        default_factory=lambda: float(os.environ.get("PGSCALE_STALLED_RETRY_SECONDS", "30"))
    )


@dataclass
class Context:
    """What a reconcile may use: the API client and the operator's configuration."""

    kube: Kube
    config: OperatorConfig


@dataclass
class Result:
    """How a reconcile ended when it raised nothing."""

    reason: str
    message: str
    done: bool = True  # False: long work under way (Ready False, Reconciling True)
    requeue_after: float | None = None
    events: list[Event] = field(default_factory=list)  # (reason, message, warning) of actions


class StatusWriter:
    """Holds a resource's status while it is reconciled; ``flush`` writes it back.

    Fields are written through the kind's status model (``update(PartitionPolicyStatus(...))``),
    so a field the model lacks fails here, in the tests, instead of being pruned silently by the
    API server; the camelCase wire names come from the model's aliases.
    """

    def __init__(self, kube: Kube, kind: Kind, obj: dict[str, Any]) -> None:
        self.kube = kube
        self.kind = kind
        self.namespace = obj["metadata"]["namespace"]
        self.name = obj["metadata"]["name"]
        self.generation: int | None = obj["metadata"].get("generation")
        self.status: dict[str, Any] = dict(obj.get("status") or {})
        self._sent: dict[str, Any] = dict(self.status)

    @property
    def conditions(self) -> cond.Conditions:
        """The conditions held now (one an older version wrote that this one cannot read is left out)."""
        out = []
        for raw in self.status.get(CONDITIONS) or []:
            with contextlib.suppress(ValidationError):
                out.append(Condition.model_validate(raw, extra="ignore"))
        return out

    @conditions.setter
    def conditions(self, value: cond.Conditions) -> None:
        self.status[CONDITIONS] = [c.wire() for c in value]

    @property
    def observed_generation(self) -> int | None:
        """The generation the status held now reflects."""
        value = self.status.get(OBSERVED_GENERATION)
        return value if isinstance(value, int) else None

    def update(self, fields: BaseStatus) -> None:
        """Set the fields given to the model (None removes a field); the others stay as they are."""
        if not isinstance(fields, self.kind.status):
            raise TypeError(f"{self.kind.name} status is {self.kind.status.__name__}, not {type(fields).__name__}")
        wire = fields.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")
        for name in fields.model_fields_set:
            alias = wire_name(type(fields), name)
            self.status[alias] = wire.get(alias)

    def read(self, model: type[StatusT]) -> StatusT:
        """The status as held now, parsed by the kind's status model."""
        if model is not self.kind.status:
            raise TypeError(f"{self.kind.name} status is {self.kind.status.__name__}, not {model.__name__}")
        known = status_fields(self.kind)  # a field an older version wrote must not fail a reconcile
        return model.model_validate({k: v for k, v in self.status.items() if v is not None and k in known})

    def flush(self) -> None:
        """Send what changed since the last flush as one merge patch."""
        patch = {k: _replacing(self._sent.get(k), v) for k, v in self.status.items() if self._sent.get(k) != v}
        patch.update({k: None for k in self._sent if k not in self.status})
        unknown = set(patch) - status_fields(self.kind)
        if unknown:  # the API server would prune it without a word
            raise ValueError(f"{self.kind.name} status has no field {', '.join(sorted(unknown))}")
        if patch:
            self.kube.patch_status(self.kind, self.namespace, self.name, patch)
            self._sent = dict(self.status)


CONDITIONS = wire_name(BaseStatus, "conditions")
OBSERVED_GENERATION = wire_name(BaseStatus, "observed_generation")


def status_fields(kind: Kind) -> set[str]:
    """The wire names of a kind's status fields."""
    return {wire_name(kind.status, name) for name in kind.status.model_fields}


def _replacing(old: Any, new: Any) -> Any:
    """`new` as a merge-patch value that replaces `old`: keys `old` has and `new` lacks become null."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**{k: None for k in old if k not in new}, **{k: _replacing(old.get(k), v) for k, v in new.items()}}


class Controller(Protocol, Generic[SpecT]):
    """One controller per kind; see controllers/<kind>.py.

    A controller that creates something outside the cluster (a pg_cron job, a
    replication slot) adds FINALIZER while that thing exists (``ensure_finalizer``) and
    implements ``finalize``: the scaffold calls it when the resource is deleted.
    """

    kind: Kind

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: SpecT, status: StatusWriter) -> Result: ...


FINALIZER = "pgscale.io/cleanup"


def has_finalizer(obj: dict[str, Any]) -> bool:
    return FINALIZER in (obj["metadata"].get("finalizers") or [])


def ensure_finalizer(ctx: Context, kind: Kind, obj: dict[str, Any], needed: bool) -> None:
    """Add or drop pgscale's finalizer, so deletion waits for cleanup only when there is some."""
    current = list(obj["metadata"].get("finalizers") or [])
    if needed == (FINALIZER in current):
        return
    wanted = [*current, FINALIZER] if needed else [f for f in current if f != FINALIZER]
    meta = obj["metadata"]
    ctx.kube.patch_metadata(kind, meta["namespace"], meta["name"], {"finalizers": wanted or None})
    meta["finalizers"] = wanted


def parse_spec(kind: Kind, obj: dict[str, Any]) -> BaseModel:
    """The spec as its model; the CRD already rejects most bad input, this catches the rest."""
    try:
        return kind.spec.model_validate(obj.get("spec") or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SpecError(where, first["msg"]) from exc


def profile_connection(ctx: Context, namespace: str, profile_name: str) -> ConnInfo:
    """The connection of a DatabaseProfile, from its spec and Secret."""
    return load_profile(ctx, namespace, profile_name)[1]


def load_profile(ctx: Context, namespace: str, profile_name: str) -> tuple[DatabaseProfileSpec, ConnInfo]:
    """A DatabaseProfile's spec and resolved connection."""
    profile = ctx.kube.get(DATABASE_PROFILE, namespace, profile_name)
    if profile is None:
        raise DependencyError(
            f"DatabaseProfile {profile_name!r} not found in namespace {namespace!r}: create it or fix "
            "spec.profileRef.name",
            reason="ProfileNotFound",
        )
    try:
        spec = parse_spec(DATABASE_PROFILE, profile)
    except SpecError as exc:
        raise DependencyError(
            f"DatabaseProfile {profile_name!r} is invalid ({exc.message}); fix the profile",
            reason="ProfileNotReady",
        ) from exc
    assert isinstance(spec, DatabaseProfileSpec)
    return spec, secret_connection(ctx, namespace, spec)


def secret_connection(ctx: Context, namespace: str, spec: DatabaseProfileSpec) -> ConnInfo:
    """Resolve a profile's connection spec against its Secret."""
    return profile_secret(ctx, namespace, spec)[0]


def profile_secret(ctx: Context, namespace: str, spec: DatabaseProfileSpec) -> tuple[ConnInfo, dict[str, str]]:
    """A profile's connection, resolved against its Secret, and the Secret's labels (a CloudNativePG
    Secret names its Cluster in cnpg.io/cluster)."""
    secret_name = spec.connection.secret_ref.name
    found = ctx.kube.read_secret_and_labels(namespace, secret_name)
    if found is None:
        raise DependencyError(
            f"Secret {secret_name!r} not found in namespace {namespace!r}: create it with a `uri` key "
            "or host/port/dbname/username/password keys (spec.connection.secretRef.name)",
            reason="SecretNotFound",
        )
    secret, labels = found
    return resolve(spec.connection, secret, secret_name), labels


def destination_credentials(ctx: Context, namespace: str, destination: Destination, field: str) -> dict[str, str]:
    """The environment a job gets for a destination (FileMigration's model): the access keys of its
    credentialsSecretRef as AWS_* variables (none for a volume or the pod's own credentials)."""
    s3 = destination.s3
    if s3 is None or s3.credentials_secret_ref is None:
        return {}
    ref = s3.credentials_secret_ref
    secret = ctx.kube.read_secret(namespace, ref.name)
    keys = (ref.access_key_id_key, ref.secret_access_key_key)
    if secret is None or any(k not in secret for k in keys):
        raise DependencyError(
            f"Secret {ref.name!r} with keys {', '.join(keys)} not found: create it or fix "
            f"spec.{field}.s3.credentialsSecretRef",
            reason="SecretNotFound",
        )
    return {"AWS_ACCESS_KEY_ID": secret[keys[0]], "AWS_SECRET_ACCESS_KEY": secret[keys[1]]}


def check_destination(ctx: Context, namespace: str, destination: Destination, field: str) -> str:
    """Write (create-only) and read a small object in a bucket with the job's access keys, so a bucket
    that cannot take files is Stalled naming the field, before any run. Returns where files go.

    A volume is mounted only in the job's pod: its runs report a failing one (deleting nothing)."""
    from ..storage import open_store, probe, problem

    env = destination_credentials(ctx, namespace, destination, field)
    if destination.s3 is None:
        return f"volume {destination.filesystem.claim_name if destination.filesystem else ''}"
    if destination.s3.credentials_secret_ref is None:
        return open_store(destination, {}).location("")  # the pod's own credentials: not the operator's
    store = open_store(destination, env, attempts=2, connect_timeout=5)
    try:
        probe(store)
    except Exception as exc:
        found = problem(exc, destination, field)
        if found is None:
            raise DependencyError(
                f"spec.{field}: writing a test object to {store.location('')} failed: {type(exc).__name__}: {exc}",
                reason="DestinationUnavailable",
            ) from exc
        where, reason, message = found
        raise SpecError(where, message, reason=reason) from exc
    return store.location("")


@dataclass(frozen=True)
class Outcome:
    """When to look at a resource again, and whether this reconcile failed (for backoff)."""

    requeue_after: float
    failed: bool


MIN_REQUEUE_SECONDS = 5.0  # a 0s interval in a spec must not turn into a busy loop
# Cleanup reaches the database through the profile and its Secret: without them it can never
# succeed, and holding the finalizer would keep the resource (and its namespace) forever.
CLEANUP_IMPOSSIBLE = frozenset({"ProfileNotFound", "SecretNotFound"})
LEFT_BEHIND = (
    "whatever pgscale had created for it in the database (see docs/troubleshooting.md, "
    "'Finalizer released', for what each kind keeps there and how to remove it)"
)


def finalize(ctrl: Controller[Any], ctx: Context, obj: dict[str, Any]) -> Outcome:
    """A deleted resource: clean up outside the cluster, then let Kubernetes remove it."""
    ref = ObjectRef.of(obj)
    if not has_finalizer(obj):
        return Outcome(30.0, failed=False)  # the DELETED event forgets the key
    cleanup = getattr(ctrl, "finalize", None)
    try:
        if cleanup is not None:
            cleanup(ctx, obj, parse_spec(ctrl.kind, obj))
    except ReconcileError as exc:
        if exc.reason in CLEANUP_IMPOSSIBLE:
            return release(ctrl, ctx, obj, exc)
        ctx.kube.event(ref, "CleanupFailed", f"{exc.message}; deletion waits and retries", warning=True)
        return Outcome(exc.retry_seconds or ctx.config.stalled_retry_seconds, failed=True)
    except psycopg.Error as exc:
        ctx.kube.event(ref, "CleanupFailed", f"{type(exc).__name__}: {exc}; deletion waits and retries", warning=True)
        return Outcome(ctx.config.stalled_retry_seconds, failed=True)
    ensure_finalizer(ctx, ctrl.kind, obj, needed=False)
    log.info("%s %s/%s: cleaned up", ctrl.kind.name, ref.namespace, ref.name)
    return Outcome(30.0, failed=False)


def release(ctrl: Controller[Any], ctx: Context, obj: dict[str, Any], exc: ReconcileError) -> Outcome:
    """Cleanup is impossible: let the resource go, with a Warning that says what stayed and how to remove it."""
    ref = ObjectRef.of(obj)
    describe = getattr(ctrl, "left_behind", None)
    try:
        what = describe(obj, parse_spec(ctrl.kind, obj)) if describe is not None else LEFT_BEHIND
    except ReconcileError:
        what = LEFT_BEHIND
    message = f"cleanup is impossible ({exc.message}); the finalizer was released. Left behind: {what}"
    ctx.kube.event(ref, "FinalizerReleased", message, warning=True)
    log.warning("%s %s/%s: %s", ctrl.kind.name, ref.namespace, ref.name, message)
    ensure_finalizer(ctx, ctrl.kind, obj, needed=False)
    return Outcome(30.0, failed=False)


CONFLICT = "Conflict"


def same_table(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two specs name the same table through the same profile."""
    ta, tb = a.get("table") or {}, b.get("table") or {}
    schema = default_of(TableReference, "schema_")
    return (
        a.get("profileRef") == b.get("profileRef")
        and ta.get("name") == tb.get("name")
        and ta.get("schema", schema) == tb.get("schema", schema)
    )


def partition_owner(ctx: Context, namespace: str, spec: dict[str, Any]) -> str | None:
    """The PartitionPolicy that owns the partitions of a table (manages their retention), if any.

    One owner per table: when a PartitionPolicy has `retention`, old partitions are its
    business; a RetentionPolicy on the same table then works row by row only.
    """
    from ..api import PARTITION_POLICY

    for other in ctx.kube.list_resources(PARTITION_POLICY, namespace):
        if same_table(other.get("spec") or {}, spec) and (other.get("spec") or {}).get("retention"):
            return str(other["metadata"]["name"])
    return None


API_UNAVAILABLE = "APIServerUnavailable"


def unreachable_reason(exc: BaseException) -> str:
    """One line: the innermost reason of a urllib3 error (connection refused, reset, timed out)."""
    reason = getattr(exc, "reason", None)
    text = str(reason if isinstance(reason, BaseException) else exc).strip().splitlines()
    return f"{type(reason if isinstance(reason, BaseException) else exc).__name__}: {text[0] if text else ''}"[:300]


def run_reconcile(ctrl: Controller[Any], ctx: Context, obj: dict[str, Any]) -> Outcome:
    """Reconcile one object; says when it should be looked at again."""
    kind = ctrl.kind
    ref = ObjectRef.of(obj)
    if obj["metadata"].get("deletionTimestamp"):
        return finalize(ctrl, ctx, obj)
    status = StatusWriter(ctx.kube, kind, obj)
    generation = status.generation
    before = cond.get(status.conditions, cond.READY)
    started = time.monotonic()
    if status.observed_generation != generation:
        status.conditions = cond.reconciling(
            status.conditions, "Reconciling", f"Reconciling generation {generation}", generation
        )
        status.flush()
    requeue: float
    outcome = "success"
    events: list[Event] = []
    try:
        try:
            spec = parse_spec(kind, obj)
            result = ctrl.reconcile(ctx, obj, spec, status)
        except psycopg.Error as exc:  # a known database failure is a named condition, not an InternalError
            known = classify(exc)
            if known is None:
                raise
            raise known from exc
        if result.done:
            status.conditions = cond.ready(status.conditions, result.reason, result.message, generation)
        else:
            status.conditions = cond.progressing(status.conditions, result.reason, result.message, generation)
        requeue = result.requeue_after if result.requeue_after is not None else ctx.config.resync_seconds
        # Long work the controller paces itself (done=False) may come back sooner than a spec interval may.
        requeue = max(requeue, MIN_REQUEUE_SECONDS if result.done else 0.5)
        events += result.events
    except ReconcileError as exc:
        outcome = "stalled" if exc.stalled else "retry"
        update = cond.stalled if exc.stalled else cond.waiting
        status.conditions = update(status.conditions, exc.reason, exc.message, generation)
        requeue = exc.retry_seconds or ctx.config.stalled_retry_seconds
        log.info("%s %s/%s: %s: %s", kind.name, ref.namespace, ref.name, exc.reason, exc.message)
    except ApiException as exc:  # refused by the API server: its message, not the HTTP exchange
        outcome = "error"
        reason, message = api_error(exc)
        log.warning("%s %s/%s: %s: %s", kind.name, ref.namespace, ref.name, reason, message)
        stalled = exc.status in (401, 403, 422)  # permissions and invalid objects need a person
        status.conditions = (cond.stalled if stalled else cond.waiting)(status.conditions, reason, message, generation)
        requeue = ctx.config.stalled_retry_seconds if stalled else 10.0
    except urllib3.exceptions.HTTPError as exc:  # the API server unreachable mid-reconcile: an outage, not a bug
        outcome = "retry"
        message = f"the Kubernetes API server could not be reached ({unreachable_reason(exc)}); retried"
        log.warning("%s %s/%s: %s: %s", kind.name, ref.namespace, ref.name, API_UNAVAILABLE, message)
        status.conditions = cond.waiting(status.conditions, API_UNAVAILABLE, message, generation)
        requeue = 10.0
    except Exception as exc:  # a bug or an unforeseen failure: report it, never crash-loop
        outcome = "error"
        log.exception("%s %s/%s: reconcile failed", kind.name, ref.namespace, ref.name)
        message = f"unexpected error ({type(exc).__name__}): {exc}; see the operator log"
        status.conditions = cond.stalled(status.conditions, "InternalError", message, generation)
        requeue = 60.0
    status.update(kind.status(observed_generation=generation))
    after = cond.get(status.conditions, cond.READY)  # every outcome above sets Ready
    if after is not None and (before is None or (before.status, before.reason) != (after.status, after.reason)):
        warning = after.status == "False" and cond.is_true(status.conditions, cond.STALLED)
        events.append(Event(after.reason, after.message, warning=warning))
    try:
        status.flush()
    finally:
        for event in events:
            ctx.kube.event(ref, event.reason, event.message, warning=event.warning)
        METRICS.reconcile_total.labels(kind=kind.name, outcome=outcome).inc()
        METRICS.reconcile_seconds.labels(kind=kind.name).observe(time.monotonic() - started)
    return Outcome(requeue, outcome != "success")
