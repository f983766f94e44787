"""The Postgres layer: every SQL statement pgscale runs lives in this package.

Identifiers from specs are always composed with ``psycopg.sql.Identifier``;
values are always bound parameters. Nothing here knows about Kubernetes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..errors import DependencyError, TransientError
from .connection import ConnInfo

__all__ = ["Column", "ConnInfo", "connect", "server_version", "table_columns"]


@contextmanager
def connect(info: ConnInfo, *, autocommit: bool = True) -> Iterator[psycopg.Connection]:
    """A connection, with libpq's failures turned into condition-ready errors."""
    try:
        conn = psycopg.connect(**info.kwargs(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        # libpq reports one line per address tried; keep them all (the cause is often first).
        text = "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or repr(exc)
        missing_role = 'role "' in text and "does not exist" in text
        if "password authentication failed" in text or "no password supplied" in text or missing_role:
            raise DependencyError(
                f"cannot log in to {info.describe()}: {text}; check the Secret's user and password",
                reason="AuthenticationFailed",
            ) from exc
        if "does not exist" in text:
            raise DependencyError(
                f"{info.describe()}: {text}; check the database name in the Secret or spec.connection.dbname",
                reason="DatabaseNotFound",
            ) from exc
        raise TransientError(f"cannot connect to {info.describe()}: {text}", reason="ConnectionFailed") from exc
    except UnicodeError as exc:  # the resolver cannot encode the host (IDNA): a label over 63 characters, say
        raise DependencyError(
            f"cannot connect to {info.describe()}: the host is not a valid host name ({exc}); fix "
            "spec.connection.host, or the host or uri in the Secret",
            reason="InvalidHost",
        ) from exc
    try:
        yield conn
    finally:
        conn.close()


def server_version(conn: psycopg.Connection) -> tuple[str, int]:
    """The server's version string (15.18) and number (150018)."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int"
    ).fetchone()
    assert row is not None
    return str(row[0]).split(" ")[0], int(row[1])


@dataclass(frozen=True)
class Column:
    """A column as the catalog describes it."""

    name: str
    type: str  # format_type(), e.g. "timestamp with time zone"
    not_null: bool


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, Column] | None:
    """The columns of a table (plain or partitioned), or None when there is no such table."""
    row = conn.execute(
        "SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    if row is None or row[1] not in ("r", "p"):
        return None
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (row[0],),
    ).fetchall()
    return {r[0]: Column(r[0], r[1], r[2]) for r in rows}


def is_partitioned(conn: psycopg.Connection, schema: str, table: str) -> bool:
    """Whether the table is a partitioned parent."""
    row = conn.execute(
        "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    return bool(row and row[0])


def ensure_schema(conn: psycopg.Connection, schema: str) -> None:
    """A schema, created only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the
    database even when the schema exists, and a role may own a schema without that privilege."""
    if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None:
        try:
            with conn.transaction():  # a savepoint inside a caller's transaction
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
            pass  # IF NOT EXISTS is not safe against a concurrent CREATE: another session made it first


def lock_state_ddl(conn: psycopg.Connection) -> None:
    """One session at a time creates pgscale's bookkeeping objects in this database (inside a transaction).

    Controllers and jobs may create them at the same moment, and CREATE ... IF NOT EXISTS is not
    safe against that (a unique violation in the catalog).
    """
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('pgscale.state-ddl', 0))")


def ensure_state_table(conn: psycopg.Connection, state_schema: str, table: str, definition: str) -> None:
    """pgscale's own bookkeeping table in the profile's state schema (both created when missing).

    `definition` is the column list, fixed text from this package, never from a spec.
    """
    s = sql.Identifier(state_schema)
    with conn.transaction():
        lock_state_ddl(conn)
        ensure_schema(conn, state_schema)
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} ({})").format(s, sql.Identifier(table), sql.SQL(definition))
        )


def qualified(schema: str, table: str) -> sql.Composed:
    """A schema-qualified, quoted table name for composing statements."""
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
