"""pgscale's bookkeeping schema: a role that owns it needs no CREATE privilege on the database."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgscale.pg import ensure_state_table

pytestmark = pytest.mark.postgres


def test_an_existing_state_schema_needs_no_create_on_the_database(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS keeper")
        admin.execute("CREATE ROLE keeper LOGIN PASSWORD 'k'")
        admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM PUBLIC')
        admin.execute("CREATE SCHEMA pgscale AUTHORIZATION keeper")
    dsn = (
        postgres.dsn(database)
        .replace("user=postgres", "user=keeper")
        .replace(f"password={postgres.PASSWORD}", "password=k")
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_state_table(conn, "pgscale", "probe", "id int")
        conn.execute("INSERT INTO pgscale.probe VALUES (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ensure_state_table(conn, "elsewhere", "probe", "id int")  # a new schema does need it


def test_many_sessions_creating_the_state_schema_at_once(postgres: Any, database: str) -> None:
    """CREATE SCHEMA/TABLE IF NOT EXISTS race each other: pgscale's controllers must not fail on it."""
    import threading

    errors: list[str] = []
    barrier = threading.Barrier(6)

    def create(i: int) -> None:
        with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
            barrier.wait()
            try:
                ensure_state_table(conn, "racing", f"t{i % 2}", "id int")
            except psycopg.Error as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
