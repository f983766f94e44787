"""Known database failures become named conditions on a real server, never an InternalError:
a view, a schema or table the role may not use (with the exact GRANT), a table dropped under the
monitoring snapshot, and a connection killed mid-step (the original error kept)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgscale.api.common import TableReference
from pgscale.checks import require_table
from pgscale.errors import DependencyError, SpecError, TransientError
from pgscale.pg import classify, stats
from pgscale.pg import conversion as sqlc

pytestmark = pytest.mark.postgres


def table(schema: str, name: str) -> TableReference:
    return TableReference.model_validate({"schema": schema, "name": name})


@pytest.fixture
def limited(postgres: Any, database: str) -> Iterator[tuple[str, str]]:
    """A login role without any privilege on a schema `private` holding a table (and its DSN)."""
    role = f"limited_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'x-{role}'")
        conn.execute("CREATE SCHEMA private; CREATE TABLE private.events (id bigint PRIMARY KEY, at timestamptz)")
        conn.execute("CREATE VIEW public.recent AS SELECT * FROM private.events")
    yield role, postgres.dsn(database, user=role, password=f"x-{role}")
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{role}"')
    postgres.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_a_view_is_named_as_such(postgres: Any, database: str, limited: tuple[str, str]) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn, pytest.raises(SpecError) as err:
        require_table(conn, table("public", "recent"))
    assert err.value.reason == "NotATable"
    assert '"public"."recent" is a view, not a table' in err.value.message and "does not exist" not in err.value.message


def test_missing_privileges_name_the_exact_grant(postgres: Any, database: str, limited: tuple[str, str]) -> None:
    role, dsn = limited
    events = table("private", "events")
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(DependencyError) as err:
            require_table(conn, events, owner=True)
        assert err.value.reason == "InsufficientPrivilege"
        assert f'GRANT USAGE ON SCHEMA "private" TO "{role}"' in err.value.message
    _grant(postgres, database, f'GRANT USAGE ON SCHEMA private TO "{role}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(DependencyError) as err:  # a PartitionPolicy: it alters the table
            require_table(conn, events, owner=True)
        assert f'GRANT "postgres" TO "{role}"' in err.value.message
        with pytest.raises(DependencyError) as err:  # a FileMigration: it reads and updates rows
            require_table(conn, events, privileges=("SELECT", "UPDATE"))
        assert f'GRANT SELECT, UPDATE ON "private"."events" TO "{role}"' in err.value.message
    _grant(postgres, database, f'GRANT SELECT, UPDATE ON private.events TO "{role}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert set(require_table(conn, events, privileges=("SELECT", "UPDATE"))) == {"id", "at"}


def test_a_refused_statement_is_a_named_condition(postgres: Any, database: str, limited: tuple[str, str]) -> None:
    """What no check foresaw still names the privilege, from the server's own message."""
    _, dsn = limited
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM private.events")
    known = classify(err.value)
    assert isinstance(known, DependencyError) and known.reason == "InsufficientPrivilege"
    assert "permission denied for schema private" in known.message


def test_a_table_dropped_under_the_snapshot_is_left_out(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as other:
        other.execute("CREATE TABLE doomed (id int); INSERT INTO doomed VALUES (1); ANALYZE doomed")
    with psycopg.connect(postgres.dsn(database)) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT 1 FROM pg_class LIMIT 1")  # the snapshot still lists the table
        with psycopg.connect(postgres.dsn(database), autocommit=True) as other:
            other.execute("DROP TABLE doomed")
        snap = stats.snapshot(conn, statements=False)  # was: int(None) -> TypeError -> Stalled
    assert "public.doomed" not in {t.name for t in snap.tables}


def test_connection_killed_mid_step_keeps_the_original_error(postgres: Any, database: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        assert sqlc.try_lock(conn, "public", "Task")
        pid = conn.info.backend_pid
        with pytest.raises(psycopg.OperationalError) as err:
            try:
                _grant(postgres, database, f"SELECT pg_terminate_backend({pid})")
                conn.execute("SELECT 1")
            finally:
                sqlc.unlock(conn, "public", "Task")  # was: "the connection is closed", hiding the cause
    assert err.value.sqlstate == "57P01", err.value  # admin_shutdown: the real cause
    known = classify(err.value)
    assert isinstance(known, TransientError) and known.reason == "ConnectionLost" and not known.stalled
    assert known.retry_seconds is not None and known.retry_seconds <= 2


def _grant(postgres: Any, database: str, statement: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(statement)


def test_a_role_without_replication_is_named_with_the_fix(
    postgres: Any, database: str, limited: tuple[str, str]
) -> None:
    """readReplicas with a profile role that may not create slots: a named problem, not a refused statement."""
    from pgscale.pg import replication

    role, dsn = limited
    with psycopg.connect(dsn, autocommit=True) as conn:
        problems = replication.readiness_problems(conn, "postgres", 1)
    assert any(f'ALTER ROLE "{role}" WITH REPLICATION' in p for p in problems), problems
    assert any(f'GRANT EXECUTE ON FUNCTION pg_catalog.pg_hba_file_rules() TO "{role}"' in p for p in problems)
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        assert not replication.own_role_problems(conn)  # a superuser may do all


def test_bookkeeping_of_another_role_names_the_grant(postgres: Any, database: str, limited: tuple[str, str]) -> None:
    """Two profiles with different roles on one database: the second may not use the first one's tables."""
    from pgscale.pg import ensure_state_table

    role, dsn = limited
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        ensure_state_table(conn, "pgscale_books", "runs", "id int PRIMARY KEY")
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(DependencyError) as err:
            ensure_state_table(conn, "pgscale_books", "runs", "id int PRIMARY KEY")
        assert err.value.reason == "InsufficientPrivilege"
        assert f'GRANT USAGE ON SCHEMA "pgscale_books" TO "{role}"' in err.value.message
        assert "owned by 'postgres'" in err.value.message
    _grant(postgres, database, f'GRANT USAGE ON SCHEMA pgscale_books TO "{role}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(DependencyError) as err:
            ensure_state_table(conn, "pgscale_books", "runs", "id int PRIMARY KEY")
        assert f'GRANT SELECT, INSERT, UPDATE, DELETE ON "pgscale_books"."runs" TO "{role}"' in err.value.message
    _grant(postgres, database, f'GRANT SELECT, INSERT, UPDATE, DELETE ON pgscale_books.runs TO "{role}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_state_table(conn, "pgscale_books", "runs", "id int PRIMARY KEY")  # nothing to create, all granted
