"""The operator runtime: kopf watches the six kinds, a work queue runs reconciles.

kopf's change handlers, timers and daemons would put kopf's finalizer and
annotations on every object (timers require a finalizer). pgscale only uses
kopf's watching and login: every watch event feeds a de-duplicating work queue
(as client-go's does), workers reconcile the *current* object in a thread, and
each reconcile says when to look again. That is level-triggered: a missed
event or a restart just means the next reconcile sees the current state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
import urllib3
from kopf._core.engines.peering import Identity  # a NewType of str that kopf does not export
from kubernetes.client.exceptions import ApiException

from .api import DATABASE_PROFILE, GROUP, VERSION
from .controllers import all_controllers
from .controllers.base import Context, Controller, OperatorConfig, Outcome, run_reconcile
from .kube import Kube
from .leader import LeaderElector, LeaseConfig
from .metrics import METRICS
from .monitoring import COLLECTOR
from .specs.builders import LABEL_PREFIX, MANAGED_BY

log = logging.getLogger(__name__)

Key = tuple[str, str, str]  # (plural, namespace, name)
MAX_BACKOFF_SECONDS = 300.0


class WorkQueue:
    """A key is queued at most once; a key re-added while in work runs again afterwards."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}

    def add(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)
        METRICS.queue_depth.set(len(self._queued))

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queue a key after a delay; an earlier add wins, a later one is ignored."""
        loop = asyncio.get_running_loop()
        existing = self._timers.get(key)
        if existing and existing.when() <= loop.time() + delay:
            return
        if existing:
            existing.cancel()
        self._timers[key] = loop.call_later(delay, self.add, key)

    def forget(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()
        self._dirty.discard(key)

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        METRICS.queue_depth.set(len(self._queued))
        return key

    def done(self, key: Hashable) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def clear(self) -> None:
        """Drop every queued key and timer (leadership lost: the new leader lists everything anyway)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._dirty.clear()
        self._queued.clear()
        while not self._queue.empty():
            self._queue.get_nowait()
        METRICS.queue_depth.set(0)

    def __len__(self) -> int:
        return len(self._queued)


def unreachable(exc: BaseException) -> bool:
    """Whether an error means the API server could not be reached or answered 5xx (an outage, not a bug)."""
    if isinstance(exc, ApiException):
        return exc.status in (0, None) or exc.status >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def describe(exc: BaseException) -> str:
    """One line: the innermost reason of a urllib3 retry error, or the exception's first line."""
    reason = getattr(exc, "reason", None)
    text = str(reason if isinstance(reason, BaseException) else exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class Runtime:
    """Wires controllers to kopf's watches and runs the workers.

    With an elector, both replicas watch (the standby knows every resource when it takes
    over), but only the leader queues keys and runs workers, so only it reconciles, writes
    status and records Events. Taking over queues every known resource: level-triggered
    reconciles pick up whatever the old leader left half done.
    """

    def __init__(self, ctx: Context, workers: int, elector: LeaderElector | None = None) -> None:
        self.ctx = ctx
        self.workers = workers
        self.elector = elector
        self.leading = asyncio.Event()
        self.controllers: dict[str, Controller[Any]] = {c.kind.plural: c for c in all_controllers()}
        self.queue = WorkQueue()
        self._seen: dict[Key, tuple[Any, Any, bool]] = {}
        self._failures: dict[Key, int] = {}
        self._profile_refs: dict[Key, str] = {}  # a policy's key -> the DatabaseProfile it uses
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")

    def register(self, registry: kopf.OperatorRegistry) -> None:
        """Subscribe to the six kinds, to the Jobs pgscale owns, and to start and stop."""
        for plural in self.controllers:
            kopf.on.event(GROUP, VERSION, plural, registry=registry, id=f"watch-{plural}")(self.on_event)
        owned = {"app.kubernetes.io/managed-by": MANAGED_BY}
        kopf.on.event("batch", "v1", "jobs", labels=owned, registry=registry, id="watch-jobs")(self.on_owned_event)
        kopf.on.startup(registry=registry)(self.start)
        kopf.on.cleanup(registry=registry)(self.stop)

    async def on_event(self, *, event: kopf.RawEvent, body: kopf.Body, resource: kopf.Resource, **_: Any) -> None:
        """Queue a reconcile when something a reconcile acts on changed (not our own status writes)."""
        meta = body.get("metadata", {})
        key: Key = (resource.plural, meta.get("namespace", ""), meta.get("name", ""))
        if event.get("type") == "DELETED":
            self._seen.pop(key, None)
            self._failures.pop(key, None)
            self._profile_refs.pop(key, None)
            forget = getattr(self.controllers[resource.plural], "forget", None)
            if forget is not None:
                forget(key[1], key[2])
            self.queue.forget(key)
            self._count()
            self._wake_failing(key)
            return
        fingerprint = (meta.get("generation"), dict(meta.get("annotations") or {}), "deletionTimestamp" in meta)
        profile = ((body.get("spec") or {}).get("profileRef") or {}).get("name")
        if profile:
            self._profile_refs[key] = str(profile)
        if self._seen.get(key) != fingerprint:
            previous = self._seen.get(key)
            self._seen[key] = fingerprint
            self._failures.pop(key, None)  # a changed spec deserves a prompt look
            if self.leading.is_set():
                self.queue.add(key)
            self._count()
            if previous is not None and previous[0] != fingerprint[0]:
                self._wake_failing(key)
            if resource.plural == DATABASE_PROFILE.plural:
                self._wake_dependents(key[1], key[2])

    def _wake_failing(self, changed: Key) -> None:
        """A DatabaseProfile was deleted or its spec changed: failing profiles may have waited for exactly
        that (SettingsConflict names an earlier profile on the same server), so look at them now, not
        after their backoff."""
        if changed[0] != DATABASE_PROFILE.plural or not self.leading.is_set():
            return
        for key in [k for k in self._failures if k[0] == changed[0] and k != changed]:
            self._failures.pop(key, None)
            self.queue.add(key)

    def _wake_dependents(self, namespace: str, profile: str) -> None:
        """A profile appeared or changed: policies failing on it look again now, not after their backoff."""
        if not self.leading.is_set():
            return
        for key, name in self._profile_refs.items():
            if key[1] == namespace and name == profile and key in self._failures:
                self._failures.pop(key, None)
                self.queue.add(key)

    async def on_owned_event(self, *, body: kopf.Body, **_: Any) -> None:
        """A Job of a resource changed (started, finished): look at the resource again now."""
        meta = body.get("metadata", {})
        labels = meta.get("labels") or {}
        for plural, ctrl in self.controllers.items():
            owner = labels.get(f"{LABEL_PREFIX}/{ctrl.kind.name.lower()}")
            key: Key = (plural, meta.get("namespace", ""), owner or "")
            if owner and key in self._seen and self.leading.is_set():
                self.queue.add(key)

    def _count(self) -> None:
        for plural, ctrl in self.controllers.items():
            METRICS.resources.labels(kind=ctrl.kind.name).set(sum(1 for k in self._seen if k[0] == plural))

    async def start(self, **_: Any) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(self._executor)
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self.workers)]
        log.info("pgscale started %d workers for %s", self.workers, ", ".join(self.controllers))
        if self.elector is None:
            self.lead()
        else:
            elector = self.elector

            def started() -> None:
                loop.call_soon_threadsafe(self.lead)

            def stopped() -> None:
                loop.call_soon_threadsafe(self.follow)

            elector.start(on_started=started, on_stopped=stopped)

    def lead(self) -> None:
        """Leadership gained (or no election): reconcile every resource seen so far."""
        self.leading.set()
        METRICS.leader.set(1)
        for key in self._seen:
            self.queue.add(key)

    def follow(self) -> None:
        """Leadership lost: take no new work; reconciles under way finish their step."""
        self.leading.clear()
        METRICS.leader.set(0)
        self.queue.clear()
        COLLECTOR.clear()

    async def stop(self, **_: Any) -> None:
        """Stop the workers; with an elector, release the Lease once the reconciles under way are done."""
        self.leading.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.elector is not None:
            elector, executor = self.elector, self._executor
            done = threading.Event()

            def finish() -> None:
                executor.shutdown(wait=True)  # the step a worker thread is in
                elector.stop()
                done.set()

            threading.Thread(target=finish, name="release-lease", daemon=True).start()
            deadline = time.monotonic() + 30.0
            while not done.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)

    async def _work(self, index: int) -> None:
        while True:
            await self.leading.wait()
            key = await self.queue.get()
            assert isinstance(key, tuple)
            if not self.leading.is_set():  # lost while waiting: the next leader takes it
                self.queue.done(key)
                continue
            try:
                outcome = await asyncio.get_running_loop().run_in_executor(self._executor, self._reconcile, key)
            except Exception as exc:  # the scaffold catches reconcile errors; this is I/O around it
                if unreachable(exc):  # an API server outage: one line per retry, not a traceback
                    log.warning(
                        "worker %d: %s: Kubernetes API unreachable (%s); retried with backoff",
                        index,
                        "/".join(key),
                        describe(exc),
                    )
                else:
                    log.exception("worker %d: %s failed", index, "/".join(key))
                outcome = Outcome(10.0, failed=True)
            finally:
                self.queue.done(key)
            if outcome is not None and key in self._seen and self.leading.is_set():
                self.queue.add_after(key, self.delay(key, outcome))

    def delay(self, key: Key, outcome: Outcome) -> float:
        """Success: the controller's interval. Failure: doubled per consecutive failure, capped."""
        if not outcome.failed:
            self._failures.pop(key, None)
            return outcome.requeue_after
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        return float(min(outcome.requeue_after * 2.0 ** (failures - 1), MAX_BACKOFF_SECONDS))

    def _reconcile(self, key: Key) -> Outcome | None:
        plural, namespace, name = key
        ctrl = self.controllers[plural]
        obj = self.ctx.kube.get(ctrl.kind, namespace, name)  # the current object, not the event's copy
        if obj is None:
            return None
        return run_reconcile(ctrl, self.ctx, obj)


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: pgscale's own prefixes, no peering, quiet posting."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.peering.standalone = True
    settings.posting.enabled = False  # pgscale records its own Events (kube.Kube.event)
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]


def make_registry(ctx: Context, workers: int, elector: LeaderElector | None = None) -> kopf.OperatorRegistry:
    """A kopf registry with pgscale's watches and settings."""
    registry = kopf.OperatorRegistry()
    runtime = Runtime(ctx, workers, elector)
    runtime.register(registry)
    kopf.on.startup(registry=registry)(lambda settings, **_: configure(settings))
    # The same identity as the kubernetes client: in-cluster ServiceAccount or kubeconfig.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return registry


def peering_identity(lease: LeaseConfig | None = None) -> str:
    """Who this process is to kopf: the Lease's identity, else the pod's name or the host's.

    kopf's own default asks getpass.getuser(), which raises KeyError when the uid has no
    passwd entry: the image runs as 65532 (and OpenShift picks arbitrary uids), so the
    operator crash-looped in a real pod before it set this.
    """
    if lease is not None:
        return lease.identity
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"


async def run(
    *,
    namespaces: list[str],
    liveness_port: int | None,
    workers: int,
    resync_seconds: float,
    lease: LeaseConfig | None = None,
) -> None:
    """Run the operator until it is stopped; with a lease, reconcile only while holding it."""
    ctx = Context(kube=Kube(), config=OperatorConfig(resync_seconds=resync_seconds, namespaces=list(namespaces)))
    registry = make_registry(ctx, workers, LeaderElector(lease, Kube()) if lease else None)
    await kopf.operator(
        registry=registry,
        standalone=True,
        identity=Identity(peering_identity(lease)),
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )
