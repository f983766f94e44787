"""Cache against a real PostgreSQL and a real Redis-protocol server (Debian's redis-server).

The rendered config runs the real server and enforces maxmemory and LRU eviction; the triggers
write the keys of old and new rows into the outbox in the writer's transaction; the relay (in a
thread, and as a process killed at random points) leaves no cached value that differs from the
database once it has drained.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis

from conftest import ROOT, scalar
from pgscale import pg
from pgscale.api.cache import CacheSpec, InvalidateRule
from pgscale.cache import cache_id, new_password, outbox_table, plan_table
from pgscale.errors import SpecError
from pgscale.pg import cache as sqlc
from pgscale.relay import Relay
from pgscale.specs import cache as specs

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (hack/setup.sh)"),
]
MiB = 1024 * 1024
STATE = "pgscale"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    password: str
    process: subprocess.Popen[bytes]
    config: str

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10)


def start_server(tmp: Path, spec: CacheSpec, maxmemory: int) -> Server:
    """redis-server with the config the operator renders (only port, bind and paths differ)."""
    password = new_password()
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / specs.AUTH_KEY).write_text(specs.auth_config(password))
    port = free_port()
    config = specs.server_config(
        spec, maxmemory_bytes=maxmemory, auth_file=str(tmp / specs.AUTH_KEY), data_dir=str(tmp), port=port,
        bind="127.0.0.1",
    )  # fmt: skip
    (tmp / specs.CONFIG_KEY).write_text(config)
    log = (tmp / "server.log").open("wb")
    process = subprocess.Popen(["redis-server", str(tmp / specs.CONFIG_KEY)], stdout=log, stderr=subprocess.STDOUT)
    server = Server(port, password, process, config)
    deadline = time.monotonic() + 30
    while True:
        try:
            if server.client().ping():
                return server
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(tmp / 'server.log').read_text()}") from None
            time.sleep(0.1)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "cache", CacheSpec.model_validate({"profileRef": {"name": "app"}}), 64 * MiB)
    yield s
    s.process.terminate()
    s.process.wait(10)


def test_rendered_config_enforces_maxmemory_and_lru(tmp_path: Path) -> None:
    spec = CacheSpec.model_validate({"profileRef": {"name": "app"}, "memory": "32Mi"})
    from pgscale.cache import maxmemory

    limit = maxmemory(spec, 32 * MiB)
    assert limit == 24 * MiB
    srv = start_server(tmp_path, spec, limit)
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=srv.port).ping()  # no password, no access
        r = srv.client()
        assert r.config_get("maxmemory")["maxmemory"] == str(limit)
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert r.config_get("save")["save"] == "" and r.config_get("appendonly")["appendonly"] == "no"
        value = os.urandom(256 * 1024)
        r.set("hot", value)
        # LRU's clock ticks once a second: batches of 10 MiB a second apart, 50 MiB into 24 MiB, so
        # the keys of older batches are the idlest while "hot" is read after every write.
        for batch in range(5):
            time.sleep(1.05)
            for i in range(40):
                r.set(f"cold:{batch}:{i}", value)
                r.get("hot")
        info = r.info()
        assert info["evicted_keys"] > 80
        assert info["used_memory"] <= limit * 1.1
        assert r.exists("hot") == 1
        assert not any(r.exists(f"cold:0:{i}") for i in range(40))  # the oldest untouched keys went first
        assert r.dbsize() < 200
        assert r.ping() and srv.process.poll() is None
    finally:
        srv.process.terminate()
        srv.process.wait(10)


# --- triggers ---------------------------------------------------------------------------------

TRICKY = """
CREATE SCHEMA "AppData";
CREATE TYPE "AppData"."Status" AS ENUM ('PENDING', 'DONE');
CREATE TABLE "AppData"."Item" (
    "Code" text PRIMARY KEY,
    "ownerId" bigint,
    state "AppData"."Status" NOT NULL DEFAULT 'PENDING',
    "dueAt" timestamptz
);
"""


def outbox(conn: psycopg.Connection, cid: str) -> list[tuple[str, bool]]:
    rows = conn.execute(f'SELECT key, tag FROM {STATE}."{outbox_table(cid)}" ORDER BY id').fetchall()
    conn.execute(f'DELETE FROM {STATE}."{outbox_table(cid)}"')
    return [(r[0], r[1]) for r in rows]


def test_trigger_writes_old_and_new_keys_in_the_writers_transaction(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(TRICKY)
        rule = InvalidateRule.model_validate(
            {
                "table": {"schema": "AppData", "name": "Item"},
                "keys": ["item:{Code}", "owner-items:{ownerId}", "due:{dueAt}:{state}", "all-items"],
                "tag": "items:{ownerId}",
            }
        )
        columns = list(pg.table_columns(conn, "AppData", "Item") or {})
        with pytest.raises(SpecError) as bad:
            plan_table(rule.model_copy(update={"keys": ["item:{code}"]}), 0, columns)
        assert bad.value.field == "invalidate[0].keys[0]" and "{Code}" in bad.value.message
        plan = plan_table(rule, 0, columns)
        cid = cache_id("ns", "c")
        assert sqlc.install(conn, state_schema=STATE, cid=cid, plans=[plan]) == ["AppData.Item"]
        assert sqlc.install(conn, state_schema=STATE, cid=cid, plans=[plan]) == []  # idempotent, no new lock
        conn.execute("SET TimeZone = 'America/New_York'")  # the writer's session does not change keys
        conn.execute("""INSERT INTO "AppData"."Item" VALUES ('A''b "c"', 1, 'PENDING', '2026-01-02 03:04:05+00')""")
        assert sorted(outbox(conn, cid)) == sorted(
            [
                ('item:A\'b "c"', False),
                ("owner-items:1", False),
                ("due:2026-01-02 03:04:05+00:PENDING", False),
                ("all-items", False),
                ("items:1", True),
            ]
        )
        # an update that moves the row to another owner: old and new keys, each once
        conn.execute("""UPDATE "AppData"."Item" SET "ownerId" = 2, state = 'DONE' WHERE "ownerId" = 1""")
        got = outbox(conn, cid)
        assert sorted(got) == sorted(
            [
                ('item:A\'b "c"', False),
                ("owner-items:1", False),
                ("owner-items:2", False),
                ("due:2026-01-02 03:04:05+00:PENDING", False),
                ("due:2026-01-02 03:04:05+00:DONE", False),
                ("all-items", False),
                ("items:1", True),
                ("items:2", True),
            ]
        )
        # a NULL column: no key from that template
        conn.execute("""UPDATE "AppData"."Item" SET "ownerId" = NULL, "dueAt" = NULL""")
        assert ("owner-items:2", False) in (got := outbox(conn, cid)) and all(k != "owner-items:" for k, _ in got)
        # rolled back: nothing
        with pytest.raises(psycopg.errors.RaiseException), conn.transaction():
            conn.execute("""DELETE FROM "AppData"."Item" """)
            conn.execute("DO $$ BEGIN RAISE EXCEPTION 'rollback'; END $$")
        assert outbox(conn, cid) == []
        # a TRUNCATE has no rows: each template's glob, for the relay to SCAN
        conn.execute("""INSERT INTO "AppData"."Item" VALUES ('t', 1)""")
        outbox(conn, cid)
        conn.execute('TRUNCATE "AppData"."Item"')
        rows = conn.execute(f'SELECT key, tag, pattern FROM {STATE}."{outbox_table(cid)}" ORDER BY id').fetchall()
        conn.execute(f'DELETE FROM {STATE}."{outbox_table(cid)}"')
        assert sorted(rows) == sorted(
            [
                ("item:*", False, True),
                ("owner-items:*", False, True),
                ("due:*:*", False, True),
                ("all-items", False, False),
                ("items:*", True, True),
            ]
        )
        conn.execute("""INSERT INTO "AppData"."Item" VALUES ('A''b "c"', 2)""")
        outbox(conn, cid)
        # a role with no privilege on the outbox writes through the SECURITY DEFINER function
        role = f"writer_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'x'")
        conn.execute(f'GRANT USAGE ON SCHEMA "AppData" TO {role}')
        conn.execute(f'GRANT SELECT, DELETE ON "AppData"."Item" TO {role}')
        with psycopg.connect(postgres.dsn(database, user=role, password="x"), autocommit=True) as app:
            app.execute("""DELETE FROM "AppData"."Item" """)
        assert ('item:A\'b "c"', False) in outbox(conn, cid)
        conn.execute(f'REVOKE ALL ON "AppData"."Item" FROM {role}; REVOKE ALL ON SCHEMA "AppData" FROM {role}')
        conn.execute(f"DROP ROLE {role}")
        # removal: trigger, function and outbox gone
        assert sqlc.uninstall(conn, state_schema=STATE, cid=cid) == ["AppData.Item"]
        assert sqlc.installed(conn, cid) == []
        assert not sqlc.outbox_exists(conn, STATE, cid)
        assert scalar(conn, "SELECT count(*) FROM pg_proc WHERE proname LIKE %s", (f"cache_{cid}_%",)) == 0
        conn.execute("""INSERT INTO "AppData"."Item" VALUES ('x', 1)""")  # the table works as before


# --- staleness --------------------------------------------------------------------------------

LEASE = b"lease:"
# Set the value only if the key still holds this reader's lease: a relay's DEL in between (the row
# changed after the read began) removed the lease, and the stale value is not cached.
CAS = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end return 0"


def cached_value(r: redis.Redis, key: str) -> bytes | None:
    return cast(bytes | None, r.get(key))


def read_through(r: redis.Redis, conn: psycopg.Connection, key: str, query: str, params: tuple[Any, ...]) -> Any:
    """The read-through pattern docs/cache.md describes: lease (SET NX) before reading the database."""
    cached = cached_value(r, key)
    if cached is not None and not cached.startswith(LEASE):
        return json.loads(cached)
    token = LEASE + uuid.uuid4().hex.encode()
    leased = r.set(key, token, nx=True, px=10000)
    value = [list(row) for row in conn.execute(query, params).fetchall()]
    if leased:
        r.eval(CAS, 1, key, token, json.dumps(value))
    return value


TASK = 'SELECT id, title, status, "userId" FROM "Task" WHERE id = %s'
USER_TASKS = 'SELECT id FROM "Task" WHERE "userId" = %s ORDER BY id'


def app_loop(dsn: str, url: str, stop: threading.Event, ids: list[int], users: int) -> None:
    r = redis.Redis.from_url(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rnd = random.Random()
        while not stop.is_set():
            if rnd.random() < 0.7:
                i = rnd.choice(ids)
                read_through(r, conn, f"task:{i}", TASK, (i,))
            else:
                u = rnd.randrange(users)
                read_through(r, conn, f"user-tasks:{u}", USER_TASKS, (u,))


def writer_loop(dsn: str, stop: threading.Event, ids: list[int], users: int, counter: list[int]) -> None:
    rnd = random.Random()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            i = rnd.choice(ids)
            op = rnd.random()
            with conn.transaction():
                if op < 0.4:
                    conn.execute('UPDATE "Task" SET title = %s, status = %s WHERE id = %s',
                                 (uuid.uuid4().hex[:8], rnd.choice(["PENDING", "DONE"]), i))  # fmt: skip
                elif op < 0.7:  # re-parent: the old and the new user's lists are both stale
                    conn.execute('UPDATE "Task" SET "userId" = %s WHERE id = %s', (rnd.randrange(users), i))
                elif op < 0.85:
                    conn.execute('DELETE FROM "Task" WHERE id = %s', (i,))
                else:
                    conn.execute(
                        'INSERT INTO "Task" (id, title, "userId") VALUES (%s, %s, %s) ON CONFLICT (id) DO NOTHING',
                        (i, "new", rnd.randrange(users)),
                    )
            counter[0] += 1
            time.sleep(rnd.random() * 0.002)


def stale_keys(r: redis.Redis, conn: psycopg.Connection) -> tuple[list[tuple[str, Any, Any]], int]:
    """Every cached key against the database: the stale ones, and how many were checked."""
    checked = 0
    stale = []
    for raw in r.scan_iter(count=1000):
        key = raw.decode()
        cached = cached_value(r, key)
        if cached is None or cached.startswith(LEASE):
            continue
        kind, arg = key.split(":")
        query = TASK if kind == "task" else USER_TASKS
        fresh = [list(row) for row in conn.execute(query, (int(arg),)).fetchall()]
        if json.loads(cached) != fresh:
            stale.append((key, cached, fresh))
        checked += 1
    return stale, checked


def check_no_stale(r: redis.Redis, conn: psycopg.Connection) -> int:
    stale, checked = stale_keys(r, conn)
    assert not stale, f"{len(stale)} stale of {checked}: {stale[:5]}"
    return checked


def setup_tasks(conn: psycopg.Connection, n: int, users: int) -> tuple[list[int], str]:
    conn.execute(
        'INSERT INTO "Task" (id, title, "userId") SELECT g, md5(g::text), g %% %s FROM generate_series(1, %s) g',
        (users, n),
    )
    rule = InvalidateRule.model_validate({"table": {"name": "Task"}, "keys": ["task:{id}", "user-tasks:{userId}"]})
    plan = plan_table(rule, 0, list(pg.table_columns(conn, "public", "Task") or {}))
    cid = cache_id("ns", f"c{uuid.uuid4().hex[:6]}")
    sqlc.install(conn, state_schema=STATE, cid=cid, plans=[plan])
    return list(range(1, n + 1)), cid


def wait_empty(conn: psycopg.Connection, cid: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sqlc.depth(conn, STATE, cid).rows:
        assert time.monotonic() < deadline, "the relay did not drain the outbox"
        time.sleep(0.2)


def test_no_stale_value_after_the_relay_drains(postgres: Any, database: str, server: Server) -> None:
    dsn = postgres.dsn(database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids, cid = setup_tasks(conn, 200, 20)
        relay = Relay(
            connect=lambda: psycopg.connect(dsn, autocommit=True), cache=server.client(), state_schema=STATE,
            cache_id=cid, name="ns/c", batch_size=50, poll_seconds=1.0,
        )  # fmt: skip
        stop_relay, stop = threading.Event(), threading.Event()
        writes = [0]
        threads = [
            threading.Thread(target=relay.run, args=(stop_relay,)),
            *(threading.Thread(target=app_loop, args=(dsn, server.url, stop, ids, 20)) for _ in range(3)),
            *(threading.Thread(target=writer_loop, args=(dsn, stop, ids, 20, writes)) for _ in range(2)),
        ]
        for t in threads:
            t.start()
        time.sleep(8)
        stop.set()
        for t in threads[1:]:
            t.join(30)
        wait_empty(conn, cid)
        stop_relay.set()
        threads[0].join(30)
        checked = check_no_stale(server.client(), conn)
        assert writes[0] > 200 and checked > 50, (writes, checked)
        assert relay.metrics.invalidations.labels("ns/c")._value.get() >= writes[0]
        print(f"writes={writes[0]} checked={checked}")


def relay_process(dsn_uri: str, server: Server, cid: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PGSCALE_JOB_INPUT": json.dumps(
            {
                "namespace": "ns",
                "name": "c",
                "spec": {},
                "profile": {"connection": {"secretRef": {"name": "db"}}, "stateSchema": STATE},
                "options": {"cacheId": cid, "batchSize": 20, "pollInterval": "1s", "memoryBytes": 64 * MiB},
            }
        ),
        "PGSCALE_DB_URI": dsn_uri,
        specs.ENV_CACHE_URL: server.url,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pgscale", "cache", "relay", "--metrics-port", "0"],
        env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def test_relay_killed_at_random_points_leaves_nothing_stale(
    postgres: Any, database: str, server: Server, tmp_path: Path
) -> None:
    dsn = postgres.dsn(database)
    log = tmp_path / "relay.log"
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids, cid = setup_tasks(conn, 200, 20)
        stop, stop_writer = threading.Event(), threading.Event()
        writes = [0]
        threads = [
            *(threading.Thread(target=app_loop, args=(dsn, server.url, stop, ids, 20)) for _ in range(2)),
            threading.Thread(target=writer_loop, args=(dsn, stop_writer, ids, 20, writes)),
        ]
        for t in threads:
            t.start()
        rnd = random.Random()
        kills = 0
        try:
            for _ in range(4):
                proc = relay_process(postgres.uri(database), server, cid, log)
                time.sleep(rnd.uniform(1.5, 3.0))  # the interpreter starts in ~1 s: some kills land mid-batch
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
                time.sleep(rnd.uniform(0, 1.0))  # down: the outbox grows, stale values stay cached
            stop_writer.set()
            threads[-1].join(30)
            waiting = sqlc.depth(conn, STATE, cid).rows
            before, _ = stale_keys(server.client(), conn)
            assert waiting > 0 and before, "the relay was down: stale values must be cached before it catches up"
            proc = relay_process(postgres.uri(database), server, cid, log)  # catches up, the application reading
            try:
                wait_empty(conn, cid)
                time.sleep(1)
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0, log.read_text()[-2000:]
        finally:
            stop_writer.set()
            stop.set()
            for t in threads:
                t.join(30)
        checked = check_no_stale(server.client(), conn)
        assert kills == 4 and writes[0] > 100 and checked > 50, (writes, checked)
        assert "Traceback" not in log.read_text()
        print(f"writes={writes[0]} checked={checked} kills={kills} waiting={waiting} stale before={len(before)}")


def test_notify_wakes_the_relay(postgres: Any, database: str, server: Server) -> None:
    """With a poll interval of an hour, only the trigger's NOTIFY can get the key deleted."""
    dsn = postgres.dsn(database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        _, cid = setup_tasks(conn, 10, 2)
        relay = Relay(
            connect=lambda: psycopg.connect(dsn, autocommit=True), cache=server.client(), state_schema=STATE,
            cache_id=cid, name="ns/c", poll_seconds=3600.0,
        )  # fmt: skip
        stop = threading.Event()
        thread = threading.Thread(target=relay.run, args=(stop,))
        thread.start()
        try:
            r = server.client()
            for round_ in range(3):
                r.set("task:3", b"[]")
                time.sleep(0.5)  # the relay is waiting
                conn.execute('UPDATE "Task" SET title = %s WHERE id = 3', (f"r{round_}",))
                deadline = time.monotonic() + 60
                while r.exists("task:3") and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert not r.exists("task:3"), "the NOTIFY did not wake the relay"
        finally:
            stop.set()
            thread.join(30)
        stats = sqlc.read_stats(conn, STATE, cid, 600)  # the INFO the controller's conditions read
        assert stats["maxmemory"] == 64 * MiB and "keyspace_hits" in stats and stats["used_memory_rss"] > 0


def test_truncate_deletes_every_key_its_templates_can_give(postgres: Any, database: str, server: Server) -> None:
    dsn = postgres.dsn(database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        _, cid = setup_tasks(conn, 10, 2)
        r = server.client()
        for key in ("task:1", "task:2", "user-tasks:0", "other:1", "task-list"):
            r.set(key, b"[]")
        conn.execute('TRUNCATE "Task" CASCADE')
        relay = Relay(connect=lambda: psycopg.connect(dsn, autocommit=True), cache=r, state_schema=STATE, cache_id=cid)
        assert relay.drain() == 2
        assert sorted(k.decode() for k in r.scan_iter()) == ["other:1", "task-list"]
