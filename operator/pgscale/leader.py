"""Leader election on a coordination.k8s.io Lease, so that of two replicas only one reconciles.

Why not kopf's peering: replicas of one Deployment share a priority, and kopf then freezes all
of them ("If two operators run with the same priority, all operators issue a warning and
freeze", docs.kopf.dev/en/latest/peering); it also needs kopf's own peering CRD. This is
client-go's algorithm (k8s.io/client-go/tools/leaderelection), kept small:

- a candidate takes the Lease over when its record (holder, renewTime, ...) has not changed for
  the holder's `leaseDurationSeconds`, measured by the candidate's own monotonic clock from
  when it saw the record change: clocks of different machines are never compared;
- every write is a replace conditional on the resourceVersion read, so of two candidates at
  most one wins;
- the leader renews every `renew_seconds`, and stops leading when it could not renew for
  `renew_deadline` seconds, which is shorter than the lease: it has stopped before anyone else
  may start (each request times out after a third of the deadline, so a hung one cannot
  stretch that);
- on a clean shutdown the leader releases the Lease (no holder), so a standby takes over at its
  next retry instead of waiting for the lease to run out.

A standby therefore leads at most lease_duration + retry_seconds after the leader last renewed
(17 s with the defaults, so 10-17 s after the leader died), and the deposed leader takes no new
work renew_deadline after its last renewal (the work it had started finishes: conversions run in
slices of seconds and hold an advisory lock per table, so a slice of two operators never overlaps).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from .kube import Kube

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseConfig:
    """Which Lease, who we are, and the timing (seconds)."""

    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_seconds: float = 5.0
    retry_seconds: float = 2.0

    @property
    def renew_deadline(self) -> float:
        """How long a leader keeps leading without a successful renewal: two thirds of the lease."""
        return self.lease_duration * 2 / 3

    @property
    def request_timeout(self) -> float:
        """A hung request must not keep a leader leading: its last try ends before the lease does."""
        return self.renew_deadline / 3

    def problems(self) -> list[str]:
        """What is inconsistent in the timing; empty when it is usable."""
        out = []
        if self.lease_duration < 2:
            out.append("the lease duration must be at least 2 s")
        if not 0 < self.renew_seconds < self.renew_deadline:
            out.append(
                f"renewing every {self.renew_seconds:g} s must be more often than the renew deadline, "
                f"2/3 of the lease duration ({self.renew_deadline:g} s)"
            )
        if not self.identity:
            out.append("the identity must not be empty")
        return out


def _call(callback: Callable[[], None]) -> None:
    """A callback's failure (e.g. the event loop already closed at shutdown) must not end the campaign."""
    try:
        callback()
    except Exception:
        log.exception("leader election: a callback failed")


def _micro_time(when: datetime) -> str:
    """A MicroTime as the API server parses it (RFC 3339, always six fractional digits)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for a Lease on a thread of its own, so long reconciles cannot delay a renewal."""

    def __init__(self, config: LeaseConfig, kube: Kube) -> None:
        self.config = config
        self.kube = kube
        self.leading = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observed: tuple[Any, ...] | None = None  # the Lease record last seen
        self._observed_at = 0.0  # time.monotonic() when it last changed
        self._failing = False

    def start(self, on_started: Callable[[], None], on_stopped: Callable[[], None]) -> None:
        """Campaign until stop(); the callbacks run on the elector's thread."""
        self._thread = threading.Thread(
            target=self._run, args=(on_started, on_stopped), name="leader-election", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop campaigning and release the Lease if we hold it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, on_started: Callable[[], None], on_stopped: Callable[[], None]) -> None:
        cfg = self.config
        last_renewal = 0.0
        log.info("leader election: %s campaigns for Lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        while not self._stop.is_set():
            attempted = time.monotonic()  # a renewal counts from when it was sent: the conservative end
            ok = self.try_acquire_or_renew()
            now = time.monotonic()
            if ok:
                last_renewal = attempted
                if not self.leading:
                    self._set_leading(True)
                    log.info("leader election: %s leads (Lease %s/%s)", cfg.identity, cfg.namespace, cfg.name)
                    _call(on_started)
            elif self.leading and (now - last_renewal >= cfg.renew_deadline or self._held_by_other()):
                self._set_leading(False)
                log.warning(
                    "leader election: %s lost the Lease %s/%s; standing by", cfg.identity, cfg.namespace, cfg.name
                )
                _call(on_stopped)
            self._stop.wait(cfg.renew_seconds if ok else cfg.retry_seconds)
        if self.leading:
            self._set_leading(False)
            _call(on_stopped)
            self.release()

    def _set_leading(self, leading: bool) -> None:
        self.leading = leading

    def _held_by_other(self) -> bool:
        return self._observed is not None and self._observed[0] not in (None, "", self.config.identity)

    def _path(self, name: str | None = None) -> str:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.config.namespace}/leases"
        return f"{path}/{name}" if name else path

    def _read(self) -> dict[str, Any] | None:
        try:
            return dict(self.kube._request("GET", self._path(self.config.name), timeout=self.config.request_timeout))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _write(self, lease: dict[str, Any] | None, spec: dict[str, Any]) -> None:
        """Create the Lease, or replace it only if it is still the version we read (409 otherwise)."""
        meta: dict[str, Any] = {"name": self.config.name, "namespace": self.config.namespace}
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}
        if lease is None:
            self.kube._request("POST", self._path(), body=body, timeout=self.config.request_timeout)
        else:
            meta["resourceVersion"] = lease["metadata"]["resourceVersion"]
            self.kube._request("PUT", self._path(self.config.name), body=body, timeout=self.config.request_timeout)

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards. API failures are logged, not raised."""
        cfg = self.config
        now = _micro_time(datetime.now(UTC))
        try:
            lease = self._read()
            spec = (lease or {}).get("spec") or {}
            record = tuple(
                spec.get(k)
                for k in ("holderIdentity", "renewTime", "acquireTime", "leaseDurationSeconds", "leaseTransitions")
            )
            if lease is not None and record != self._observed:
                self._seen(record)
            holder = spec.get("holderIdentity")
            duration = float(spec.get("leaseDurationSeconds") or cfg.lease_duration)
            if holder and holder != cfg.identity and time.monotonic() < self._observed_at + duration:
                self._ok()
                return False  # someone else holds it, and renewed within the lease
            ours = holder == cfg.identity
            transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours or lease is None else 1)
            mine = {
                "holderIdentity": cfg.identity,
                "leaseDurationSeconds": round(cfg.lease_duration),
                "acquireTime": spec.get("acquireTime") if ours else now,
                "renewTime": now,
                "leaseTransitions": transitions,
            }
            self._write(lease, mine)
            self._seen((cfg.identity, now))
            self._ok()
            return True
        except ApiException as exc:
            if exc.status == 409:  # another candidate wrote first: read again at the next retry
                self._ok()
                return False
            self._failed(f"the Kubernetes API answered {exc.status} {exc.reason}")
            return False
        except Exception as exc:  # connection refused, timeouts: keep campaigning
            self._failed(f"{type(exc).__name__}: {exc}")
            return False

    def release(self) -> None:
        """Give the Lease up (no holder, a 1 s lease), so a standby takes over at once."""
        cfg = self.config
        try:
            lease = self._read()
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != cfg.identity:
                return
            now = _micro_time(datetime.now(UTC))
            self._write(
                lease,
                {
                    "leaseDurationSeconds": 1,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": int(spec.get("leaseTransitions") or 0),
                },
            )
            log.info("leader election: %s released the Lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        except Exception as exc:  # the standby then waits for the lease to run out: slower, still correct
            log.warning("leader election: could not release the Lease %s/%s: %s", cfg.namespace, cfg.name, exc)

    def _seen(self, record: tuple[Any, ...]) -> None:
        self._observed = record
        self._observed_at = time.monotonic()

    def _ok(self) -> None:
        if self._failing:
            log.info("leader election: the Kubernetes API answers again")
        self._failing = False

    def _failed(self, why: str) -> None:
        """One line per outage, not one traceback per retry."""
        cfg = self.config
        if not self._failing:
            log.warning(
                "leader election: cannot read or write the Lease %s/%s: %s; retrying every %g s",
                cfg.namespace,
                cfg.name,
                why,
                cfg.retry_seconds,
            )
        else:
            log.debug("leader election: still failing: %s", why)
        self._failing = True
