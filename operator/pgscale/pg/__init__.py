"""The Postgres layer: every SQL statement pgscale runs lives in this package.

Identifiers from specs are always composed with ``psycopg.sql.Identifier``;
values are always bound parameters. Nothing here knows about Kubernetes.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..errors import DependencyError, ReconcileError, TransientError
from .connection import ConnInfo

__all__ = [
    "Column",
    "ConnInfo",
    "TableAccess",
    "connect",
    "pooled",
    "relation_kind",
    "server_version",
    "table_access",
    "table_columns",
]


@contextmanager
def connect(info: ConnInfo, *, autocommit: bool = True) -> Iterator[psycopg.Connection]:
    """A connection, with libpq's failures turned into condition-ready errors."""
    conn = _open(info, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def _open(info: ConnInfo, *, autocommit: bool) -> psycopg.Connection:
    """psycopg.connect, with libpq's failures turned into condition-ready errors."""
    try:
        return psycopg.connect(**info.kwargs(), autocommit=autocommit)
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


class Pool:
    """Idle autocommit sessions kept per connection (server, database, role), for the operator's reconciles.

    A thousand DatabaseProfiles on one database reconciled by a few workers then need a few
    sessions, not a connect (fork, authentication) per reconcile. A session goes back only when
    it is idle and healthy, after ``DISCARD ALL`` (settings, prepared statements, temporary tables,
    advisory locks of the session are gone, as in a new one); it is closed after ``idle_seconds``
    unused, when the server ended it (a restart, ``DROP DATABASE ... WITH (FORCE)``), and the
    longest idle one is closed when ``max_idle`` are idle in all: profiles on many databases of one
    server must not hold that many sessions of its max_connections. Safe to share between worker
    threads: a session is lent to one at a time.
    """

    def __init__(self, *, idle_seconds: float = 60.0, max_idle: int = 8) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle
        self._idle: dict[ConnInfo, list[tuple[float, psycopg.Connection]]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def connection(self, info: ConnInfo) -> Iterator[psycopg.Connection]:
        """An autocommit session to `info`: a healthy idle one, else a new one (errors as in ``connect``)."""
        conn = self._take(info)
        if conn is None:
            conn = _open(info, autocommit=True)
            conn.prepare_threshold = None  # DISCARD ALL drops prepared statements psycopg would think it has
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and self._reset(conn):
                self._give(info, conn)
            else:
                conn.close()

    def _take(self, info: ConnInfo) -> psycopg.Connection | None:
        now = time.monotonic()
        ended: list[psycopg.Connection] = []
        found = None
        with self._lock:
            for key, sessions in list(self._idle.items()):
                ended += [c for since, c in sessions if now - since > self.idle_seconds]
                self._idle[key] = [(since, c) for since, c in sessions if now - since <= self.idle_seconds]
            sessions = self._idle.get(info) or []
            while sessions and found is None:
                conn = sessions.pop()[1]
                if _alive(conn):
                    found = conn
                else:
                    ended.append(conn)
            for key in [k for k, v in self._idle.items() if not v]:
                del self._idle[key]
        for conn in ended:
            conn.close()
        return found

    def _give(self, info: ConnInfo, conn: psycopg.Connection) -> None:
        evicted = None
        with self._lock:
            if self.max_idle < 1:
                evicted = conn
            else:
                if sum(len(v) for v in self._idle.values()) >= self.max_idle:
                    key = min((k for k in self._idle if self._idle[k]), key=lambda k: self._idle[k][0][0])
                    evicted = self._idle[key].pop(0)[1]
                    if not self._idle[key]:
                        del self._idle[key]
                self._idle.setdefault(info, []).append((time.monotonic(), conn))
        if evicted is not None:
            evicted.close()

    @staticmethod
    def _reset(conn: psycopg.Connection) -> bool:
        """Make a returned session like a new one; False when it cannot go back."""
        if conn.closed or conn.broken or not conn.autocommit:
            return False
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return False
        try:
            conn.execute("DISCARD ALL")
        except psycopg.Error:
            return False
        return True

    def close(self) -> None:
        """Close every idle session (before something that needs the database to have no other sessions)."""
        with self._lock:
            sessions = [c for v in self._idle.values() for _, c in v]
            self._idle.clear()
        for conn in sessions:
            conn.close()

    def idle(self) -> int:
        """How many sessions are idle in the pool."""
        with self._lock:
            return sum(len(v) for v in self._idle.values())


def _alive(conn: psycopg.Connection) -> bool:
    """Whether an idle session is still usable: nothing to read on an idle session means the server has not
    ended it (a terminated session has a FATAL message and end of file waiting)."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


POOL = Pool()


def pooled(info: ConnInfo) -> contextlib.AbstractContextManager[psycopg.Connection]:
    """An autocommit session from the process's pool (see Pool): for reconciles, which run often and briefly."""
    return POOL.connection(info)


# SQLSTATEs of a session that ended under a statement: admin or crash shutdown, server starting.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})


def classify(exc: psycopg.Error) -> ReconcileError | None:
    """A database error that is a known failure, as the condition it deserves; None for anything else.

    The connection lost mid-step (a server restart) is retried fast with the original error kept; a
    privilege the role lacks names the server's message (which names the object); a lock not granted
    in time is retried. Everything else stays an InternalError: it is a bug or unforeseen.
    """
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    state = exc.sqlstate
    if isinstance(exc, psycopg.OperationalError) and (
        state is None or state.startswith("08") or state in _SESSION_ENDED
    ):
        return TransientError(
            f"the connection to the database was lost mid-step ({type(exc).__name__}: {text}); the step is "
            "resumed from its last committed state",
            reason="ConnectionLost",
            retry_seconds=2.0,
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return DependencyError(
            f"the database refused: {text}; GRANT that privilege to the role in the profile's Secret (or use "
            "the object's owner)",
            reason="InsufficientPrivilege",
        )
    if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.DeadlockDetected):
        return TransientError(f"a lock was not granted in time ({text}); retried", reason="LockTimeout")
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return TransientError(
            f"an object vanished under a query ({text}); retried", reason="ObjectVanished", retry_seconds=2.0
        )
    return None


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


RELATION_KINDS = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "i": "an index",
    "I": "a partitioned index",
    "c": "a composite type",
}


def relation_kind(conn: psycopg.Connection, schema: str, name: str) -> str | None:
    """What a relation of that name is ("a view", ...), or None when there is none (or it is a table)."""
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    return RELATION_KINDS.get(str(row[0])) if row else None


@dataclass(frozen=True)
class TableAccess:
    """What the connection's role may do with a table, from the catalog (a superuser may do all)."""

    role: str
    owner: str
    schema_usage: bool
    is_owner: bool
    missing: tuple[str, ...]  # table privileges the role lacks, of those asked for


def table_access(conn: psycopg.Connection, schema: str, table: str, privileges: tuple[str, ...]) -> TableAccess:
    """The role's access to an existing table: schema USAGE, ownership, and which privileges it lacks."""
    row = conn.execute(
        "SELECT current_user::text, pg_get_userbyid(c.relowner)::text, has_schema_privilege(n.oid, 'USAGE'), "
        "pg_has_role(c.relowner, 'USAGE'), "
        "array(SELECT p FROM unnest(%s::text[]) p WHERE NOT has_table_privilege(c.oid, p)) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (list(privileges), schema, table),
    ).fetchone()
    assert row is not None
    return TableAccess(str(row[0]), str(row[1]), bool(row[2]), bool(row[3]), tuple(row[4] or ()))


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
        if require_state_access(conn, state_schema, table):
            return  # it exists: CREATE ... IF NOT EXISTS would still need CREATE on the schema
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {}.{} ({})").format(s, sql.Identifier(table), sql.SQL(definition))
        )


STATE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


def require_state_access(conn: psycopg.Connection, state_schema: str, table: str) -> bool:
    """Whether the bookkeeping table exists; DependencyError with the exact GRANT when the role may not use it:
    typically two profiles with different roles on one database, the schema or table created by the other."""
    row = conn.execute(
        "SELECT current_user::text, pg_get_userbyid(n.nspowner)::text, has_schema_privilege(n.oid, 'USAGE'), "
        "has_schema_privilege(n.oid, 'CREATE'), c.oid IS NOT NULL, coalesce(pg_get_userbyid(c.relowner)::text, ''), "
        "array(SELECT p FROM unnest(%s::text[]) p WHERE c.oid IS NOT NULL AND NOT has_table_privilege(c.oid, p)) "
        "FROM pg_namespace n LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = %s WHERE n.nspname = %s",
        (list(STATE_PRIVILEGES), table, state_schema),
    ).fetchone()
    if row is None:
        return False
    role, schema_owner, usage, create, exists, table_owner, missing = row
    who = sql.Identifier(role).as_string(None)
    schema = sql.Identifier(state_schema).as_string(None)
    if not usage or (not exists and not create):
        privileges, owner = ("USAGE, CREATE" if not exists else "USAGE"), schema_owner
        what, grant = f"schema {schema}", f"GRANT {privileges} ON SCHEMA {schema} TO {who}"
    elif missing:
        owner = table_owner
        what = f"pgscale's bookkeeping table {schema}.{sql.Identifier(table).as_string(None)}"
        grant = f"GRANT {', '.join(missing)} ON {qualified(state_schema, table).as_string(None)} TO {who}"
    else:
        return bool(exists)
    raise DependencyError(
        f"role {role!r} may not use {what} (owned by {owner!r}: another profile with another role on this "
        f"database?): run `{grant}` as {owner!r}, or give both profiles the same role or different stateSchema",
        reason="InsufficientPrivilege",
    )


def qualified(schema: str, table: str) -> sql.Composed:
    """A schema-qualified, quoted table name for composing statements."""
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
