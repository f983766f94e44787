"""`pgscale cache relay`: delete in the cache the keys a Cache's triggers wrote to its outbox.

One transaction per batch: claim the oldest outbox rows (FOR UPDATE SKIP LOCKED), delete their
keys in the cache (a tag: every key in its set, then the set, atomically in a script), and only
then delete the rows and commit. A failure anywhere rolls back and the rows are claimed again:
at-least-once, never lost; a relay that was down catches up from the outbox. NOTIFY only wakes
the relay early; the poll interval bounds the delay without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .cache import outbox_table
from .durations import seconds
from .metrics import PREFIX
from .pg import cache as sqlc
from .redact import remember, uri_passwords

log = logging.getLogger(__name__)

# Deletes the members of a tag's set and the set, atomically: a key registered meanwhile is either
# deleted with the set or registered in a new one, never dropped from the set while it stays cached.
DELETE_TAG = """
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then return redis.call('DEL', KEYS[1]) end
local n = 0
for _, k in ipairs(redis.call('SMEMBERS', KEYS[1])) do n = n + redis.call('DEL', k) end
redis.call('DEL', KEYS[1])
return n
"""
DEL_CHUNK = 512
# INFO fields exported as gauges (the server's own counters; rates and ratios are PromQL's job).
INFO_FIELDS = (
    "keyspace_hits",
    "keyspace_misses",
    "used_memory",
    "maxmemory",
    "evicted_keys",
    "connected_clients",
    "expired_keys",
    "used_memory_rss",
)


@dataclass
class RelayMetrics:
    """The relay's metrics, on a registry of its own (the relay's pod serves only these)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        labels = ["cache"]  # namespace/name
        self.invalidations = Counter(
            f"{PREFIX}_cache_invalidations", "Outbox rows whose keys were deleted in the cache.", labels, registry=r
        )
        self.keys_deleted = Counter(
            f"{PREFIX}_cache_keys_deleted", "Keys that existed in the cache when deleted.", labels, registry=r
        )
        self.lag = Histogram(
            f"{PREFIX}_cache_invalidation_lag_seconds",
            "From the change's trigger in the writer's transaction to the key's deletion.",
            labels,
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.depth = Gauge(f"{PREFIX}_cache_outbox_depth", "Outbox rows waiting for the relay.", labels, registry=r)
        self.oldest = Gauge(
            f"{PREFIX}_cache_outbox_oldest_seconds", "Age of the oldest outbox row (0 when empty).", labels, registry=r
        )
        self.errors = Counter(
            f"{PREFIX}_cache_relay_errors", "Batches rolled back (cache or database failure).", labels, registry=r
        )
        self.info = Gauge(
            f"{PREFIX}_cache_server_info", "Fields of the cache server's INFO, by name.", [*labels, "field"], registry=r
        )
        self.memory_limit = Gauge(
            f"{PREFIX}_cache_memory_limit_bytes", "Memory of the cache container (by tier or spec).", labels, registry=r
        )


@dataclass
class Relay:
    """Drains one Cache's outbox into deletions in its cache."""

    connect: Callable[[], psycopg.Connection]  # an autocommit connection to the profile's database
    cache: redis.Redis
    state_schema: str
    cache_id: str
    name: str = ""  # namespace/name, the metrics' label
    batch_size: int = 500
    poll_seconds: float = 5.0
    metrics: RelayMetrics = field(default_factory=RelayMetrics)
    memory_bytes: int = 0  # the container's memory, for the memory gauge
    on_deleted: Callable[[list[float]], None] | None = None  # each row's lag, after its commit (bench/cache.py)
    _conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.connect()
        return self._conn

    def batch(self) -> int:
        """One batch: claim, delete in the cache, delete the rows, commit. Returns the rows handled."""
        conn = self._connection()
        with conn.transaction():
            entries = sqlc.claim(conn, self.state_schema, self.cache_id, self.batch_size)
            if not entries:
                return 0
            claimed = time.monotonic()
            deleted = 0
            keys = list(dict.fromkeys(e.key for e in entries if not e.tag and not e.pattern))
            tags = list(dict.fromkeys(e.key for e in entries if e.tag and not e.pattern))
            for entry in entries:  # a TRUNCATE: every key (or tag set) its templates can give
                if entry.pattern:
                    found = self.cache.scan_iter(entry.key, 1000)
                    (tags if entry.tag else keys).extend(k.decode() if isinstance(k, bytes) else str(k) for k in found)
            for start in range(0, len(keys), DEL_CHUNK):
                deleted += int(self.cache.delete(*keys[start : start + DEL_CHUNK]))
            for tag in tags:
                deleted += int(cast(int, self.cache.eval(DELETE_TAG, 1, tag)))
            # From the trigger (in the writer's transaction, just before its commit) to the delete.
            lags = [e.age_seconds + time.monotonic() - claimed for e in entries]
            sqlc.remove(conn, self.state_schema, self.cache_id, [e.id for e in entries])
        for lag in lags:
            self.metrics.lag.labels(self.name).observe(lag)
        if self.on_deleted is not None:
            self.on_deleted(lags)
        self.metrics.invalidations.labels(self.name).inc(len(entries))
        self.metrics.keys_deleted.labels(self.name).inc(deleted)
        return len(entries)

    def drain(self, stop: threading.Event | None = None) -> int:
        """Batches until the outbox is empty (rows other relays hold are skipped), or until stopped
        (a SIGTERM during a long catch-up ends after the batch at hand)."""
        total = 0
        while stop is None or not stop.is_set():
            n = self.batch()
            total += n
            if n < self.batch_size:
                break
        return total

    def observe(self) -> None:
        """Outbox depth and the server's INFO counters, for the gauges."""
        depth = sqlc.depth(self._connection(), self.state_schema, self.cache_id)
        self.metrics.depth.labels(self.name).set(depth.rows)
        self.metrics.oldest.labels(self.name).set(depth.oldest_seconds or 0.0)
        info: dict[str, Any] = self.cache.info()
        values = {n: float(info[n]) for n in INFO_FIELDS if isinstance(info.get(n), int | float)}
        for name, value in values.items():
            self.metrics.info.labels(self.name, name).set(value)
        if self.memory_bytes:
            self.metrics.memory_limit.labels(self.name).set(self.memory_bytes)
        sqlc.write_stats(self._connection(), self.state_schema, self.cache_id, values)

    def run(self, stop: threading.Event) -> None:
        """Until stopped: drain, then wait for a NOTIFY or the poll interval. Failures are logged and
        retried with backoff; nothing is lost (the rows stay in the outbox)."""
        backoff = 0.5
        listener: psycopg.Connection | None = None
        last_observe = 0.0
        while not stop.is_set():
            try:
                if listener is None or listener.closed:
                    listener = self.connect()
                    sqlc.listen(listener, self.cache_id)
                self.drain(stop)
                if time.monotonic() - last_observe >= self.poll_seconds:
                    self.observe()
                    last_observe = time.monotonic()
                backoff = 0.5
                self._wait(listener, stop)
            except (psycopg.Error, redis.RedisError, OSError) as exc:
                self.metrics.errors.labels(self.name).inc()
                log.warning("cache relay: %s: %s; retrying in %.1fs", type(exc).__name__, exc, backoff)
                for conn in (listener, self._conn):
                    if conn is not None and not conn.closed:
                        conn.close()
                listener = self._conn = None
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        for conn in (listener, self._conn):
            if conn is not None and not conn.closed:
                conn.close()

    def _wait(self, listener: psycopg.Connection, stop: threading.Event) -> None:
        """Block until a notification, the poll interval, or (within 0.5 s) a stop."""
        deadline = time.monotonic() + self.poll_seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # Short waits, so that a stop is seen within half a second; one NOTIFY is enough to wake.
            if list(listener.notifies(timeout=min(left, 0.5), stop_after=1)):
                return


def from_environment(metrics: RelayMetrics | None = None) -> Relay:
    """The relay a pod's environment describes (the operator rendered it; see specs/cache.py)."""
    from . import jobs
    from .specs.cache import ENV_CACHE_URL

    job = jobs.from_env()
    url = os.environ.get(ENV_CACHE_URL, "")
    if job is None or not url:
        raise SystemExit(f"pgscale cache relay: PGSCALE_JOB_INPUT and {ENV_CACHE_URL} must be set (run by a pod)")
    remember(url, *uri_passwords(url))
    options = job.options
    info = job.conn

    def connect() -> psycopg.Connection:
        return psycopg.connect(**info.kwargs(), autocommit=True)

    return Relay(
        connect=connect,
        cache=redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10),
        state_schema=job.state_schema,
        cache_id=str(options["cacheId"]),
        name=job.policy_key,
        batch_size=int(options["batchSize"]),
        poll_seconds=seconds(str(options["pollInterval"])),
        memory_bytes=int(options["memoryBytes"]),
        metrics=metrics or RelayMetrics(),
    )


def main(args: argparse.Namespace) -> int:
    relay = from_environment()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr="0.0.0.0", registry=relay.metrics.registry)  # noqa: S104
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("cache relay %s: draining %s.%s", relay.name, relay.state_schema, outbox_table(relay.cache_id))
    if args.once:
        relay.drain()
        return 0
    relay.run(stop)
    return 0
