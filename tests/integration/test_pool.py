"""pg.Pool: reconciles share a few sessions per database; a returned session is like a new one, a dead one is
never lent, and a session a reconcile left in a bad state is closed, not reused."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from pgscale import pg
from pgscale.pg.connection import ConnInfo

pytestmark = pytest.mark.postgres


def info_of(postgres: Any, database: str) -> ConnInfo:
    return ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )


def backend(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]


def test_a_returned_session_is_reused_and_reset(postgres: Any, database: str) -> None:
    pool = pg.Pool()
    info = info_of(postgres, database)
    try:
        with pool.connection(info) as conn:
            pid = backend(conn)
            conn.execute("SET lock_timeout = '1234ms'")
            conn.execute("SELECT pg_advisory_lock(42)")
            conn.execute("CREATE TEMP TABLE scratch (id int)")
            for _ in range(6):  # past psycopg's prepare threshold: DISCARD ALL must not break prepared queries
                conn.execute("SELECT %s::int", (1,))
        assert pool.idle() == 1
        with pool.connection(info) as conn:
            assert backend(conn) == pid  # the same session, no new connect
            assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)
            assert conn.execute("SELECT to_regclass('pg_temp.scratch')").fetchone() == (None,)
            for _ in range(6):
                conn.execute("SELECT %s::int", (1,))
        with psycopg.connect(postgres.dsn(database), autocommit=True) as other:  # the advisory lock went with DISCARD
            assert other.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)
        with pool.connection(info) as first, pool.connection(info) as second:  # one session per borrower
            assert backend(first) != backend(second)
        assert pool.idle() == 2
    finally:
        pool.close()
    assert pool.idle() == 0


def test_a_session_in_a_bad_state_or_ended_by_the_server_is_not_lent(postgres: Any, database: str) -> None:
    pool = pg.Pool()
    info = info_of(postgres, database)
    try:
        with pytest.raises(psycopg.errors.DivisionByZero), pool.connection(info) as conn:
            conn.execute("SELECT 1 / 0")
        assert pool.idle() == 0  # the borrower failed: closed, not returned
        with pool.connection(info) as conn:
            conn.execute("BEGIN")  # left in a transaction: closed, not returned
        assert pool.idle() == 0
        with pool.connection(info) as conn:
            pid = backend(conn)
        with psycopg.connect(postgres.dsn(database), autocommit=True) as admin:  # a restart or DROP ... WITH (FORCE)
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            deadline = time.monotonic() + 10
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with pool.connection(info) as conn:
            assert backend(conn) != pid  # the ended session was dropped, a new one opened
    finally:
        pool.close()


def test_idle_sessions_are_closed_after_the_idle_timeout(postgres: Any, database: str) -> None:
    pool = pg.Pool(idle_seconds=0.2)
    info = info_of(postgres, database)
    try:
        with pool.connection(info) as conn:
            pid = backend(conn)
        time.sleep(0.4)
        with pool.connection(info) as conn:
            assert backend(conn) != pid
    finally:
        pool.close()


def test_idle_sessions_are_bounded_across_databases(postgres: Any, database: str) -> None:
    pool = pg.Pool(max_idle=1)  # profiles on many databases of one server: the longest idle one goes
    first, second = info_of(postgres, database), info_of(postgres, "postgres")
    try:
        with pool.connection(first) as conn:
            pid = backend(conn)
        with pool.connection(second):
            pass
        assert pool.idle() == 1
        with pool.connection(first) as conn:
            assert backend(conn) != pid
    finally:
        pool.close()
