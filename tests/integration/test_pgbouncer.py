"""The generated pgbouncer.ini and userlist.txt run Debian's real PgBouncer in front of a real Postgres.

Clients connect THROUGH PgBouncer; the server's pg_stat_activity shows how many
backends PgBouncer really opened, so the pool limits are checked where they matter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import localenv
import psycopg
import pytest

from conftest import scalar
from pgscale.api.databaseprofile import PoolingSpec
from pgscale.specs import pooling

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

StartPgBouncer = Callable[..., localenv.PgBouncer]


@pytest.fixture
def pgbouncer(postgres: localenv.Postgres, database: str, tmp_path: Path) -> Iterator[StartPgBouncer]:
    """Starts PgBouncer for the test database with a pooling spec; stopped after the test."""
    started: list[localenv.PgBouncer] = []

    def start(
        spec: dict[str, Any] | None = None, password: str | None = None, admin_users: list[str] | None = None
    ) -> localenv.PgBouncer:
        bouncer = localenv.PgBouncer(tmp_path, name=f"pgbouncer{len(started)}")
        text = pooling.pgbouncer_ini(
            PoolingSpec.model_validate(spec or {}),
            backend_host=postgres.host,
            backend_port=postgres.port,
            dbname=database,
            listen_port=bouncer.port,
            auth_file=str(bouncer.auth_file),
            listen_addr="127.0.0.1",
            admin_users=admin_users,
        )
        started.append(bouncer)
        return bouncer.start(text, pooling.userlist("postgres", password or postgres.PASSWORD))

    yield start
    for bouncer in started:
        bouncer.stop()


def connect(bouncer: localenv.PgBouncer, database: str, **kwargs: Any) -> psycopg.Connection[Any]:
    # prepare_threshold=None: PgBouncer 1.18 cannot keep prepared statements across transactions.
    return psycopg.connect(bouncer.dsn(database), autocommit=True, prepare_threshold=None, connect_timeout=5, **kwargs)


def server_backends(postgres: localenv.Postgres, database: str) -> int:
    """Client backends connected to the test database: only PgBouncer connects there."""
    with psycopg.connect(postgres.dsn("postgres"), autocommit=True) as conn:
        return int(
            scalar(
                conn,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                [database],
            )
        )


@pytest.mark.parametrize("secret", ["plain", "scram"])
def test_query_through_pgbouncer(
    pgbouncer: StartPgBouncer, postgres: localenv.Postgres, database: str, secret: str
) -> None:
    password = None
    if secret == "scram":  # the role's stored SCRAM secret instead of the password itself
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            password = scalar(conn, "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
        assert password.startswith("SCRAM-SHA-256$")
    bouncer = pgbouncer(password=password)
    with connect(bouncer, database, application_name="through-pgbouncer") as conn:
        row = conn.execute('SELECT current_database(), inet_server_port(), count(*) FROM "Task"').fetchone()
        assert row == (database, postgres.port, 0)  # the server's port: the query ran on Postgres
    with pytest.raises(psycopg.OperationalError, match=r"password authentication failed|SASL authentication failed"):
        psycopg.connect(bouncer.dsn(database, password="wrong"), connect_timeout=5).close()


def test_pool_size_caps_server_connections(
    pgbouncer: StartPgBouncer, postgres: localenv.Postgres, database: str
) -> None:
    bouncer = pgbouncer({"poolMode": "transaction", "defaultPoolSize": 2})
    clients, sleep = 10, 0.3
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        with psycopg.connect(postgres.dsn("postgres"), autocommit=True) as conn:
            while not done.is_set():
                n = int(
                    scalar(
                        conn,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                        [database],
                    )
                )
                peak = max(peak, n)
                time.sleep(0.02)

    def client(i: int) -> float:
        with connect(bouncer, database, application_name=f"client-{i}") as conn:
            return float(scalar(conn, "SELECT extract(epoch FROM clock_timestamp()) FROM pg_sleep(%s)", [sleep]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            finished = list(pool.map(client, range(clients)))
        elapsed = time.monotonic() - started
    finally:
        done.set()
        watcher.join()
    assert len(finished) == clients  # every client got its answer
    assert peak == 2, f"server saw {peak} backends from PgBouncer, pool size is 2"
    # 10 sleeps of 0.3 s on 2 server connections take at least 5 rounds: the clients queued.
    assert elapsed >= clients / 2 * sleep * 0.9
    assert server_backends(postgres, database) <= 2


def test_max_client_conn_refuses_the_next_client(pgbouncer: StartPgBouncer, database: str) -> None:
    bouncer = pgbouncer({"maxClientConnections": 3, "poolMode": "session", "defaultPoolSize": 3})
    held = [connect(bouncer, database) for _ in range(3)]
    try:
        for conn in held:
            assert scalar(conn, "SELECT 1") == 1
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            connect(bouncer, database).close()
        held.pop().close()
        deadline = time.monotonic() + 5  # PgBouncer notices the disconnect asynchronously
        while True:
            try:
                held.append(connect(bouncer, database))
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert scalar(held[-1], "SELECT 1") == 1
    finally:
        for conn in held:
            conn.close()


def test_settings_reach_pgbouncer(pgbouncer: StartPgBouncer, database: str) -> None:
    """The admin console reports what the generated file asked for, user parameters included."""
    spec = {
        "poolMode": "session",
        "defaultPoolSize": 4,
        "reservePoolSize": 1,
        "maxClientConnections": 40,
        "maxDbConnections": 6,
        "parameters": {
            "server_reset_query": "DISCARD ALL",
            "ignore_startup_parameters": "options",
            "server_lifetime": "600",
            "log_connections": "0",
        },
    }
    bouncer = pgbouncer(spec, admin_users=["postgres"])
    # the admin console speaks only the simple query protocol: client-side binding uses it
    with psycopg.connect(bouncer.dsn("pgbouncer"), autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert config["pool_mode"] == "session" and config["default_pool_size"] == "4"
    assert (config["reserve_pool_size"], config["max_client_conn"], config["max_db_connections"]) == ("1", "40", "6")
    assert config["auth_type"] == "scram-sha-256" and config["unix_socket_dir"] == ""
    assert config["ignore_startup_parameters"] == "extra_float_digits,options"
    assert (config["server_reset_query"], config["server_lifetime"], config["log_connections"]) == (
        "DISCARD ALL",
        "600",
        "0",
    )
    with connect(bouncer, database, options="-c search_path=public") as conn:  # `options` is ignored, not refused
        assert scalar(conn, "SELECT 1") == 1
