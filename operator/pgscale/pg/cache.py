"""A Cache's SQL: the outbox, the invalidation triggers, and the relay's reads and deletes.

The trigger runs in the writer's transaction: the keys a change makes stale are in the outbox
exactly when the change commits (lossless, unlike a bare NOTIFY, which only wakes the relay).
Key expressions are built from parsed templates: constant text as sql.Literal, columns as
sql.Identifier, joined with ``||`` so that a NULL column yields no key.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..cache import (
    Column,
    TablePlan,
    Template,
    channel,
    function_name,
    function_prefix,
    outbox_table,
    stats_table,
    trigger_name,
    truncate_function_name,
    truncate_trigger_name,
)
from . import ensure_state_table, table_columns

OUTBOX_COLUMNS = (
    "id bigserial PRIMARY KEY, key text NOT NULL, tag boolean NOT NULL DEFAULT false, "
    "pattern boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT clock_timestamp()"
)
LOCK_TIMEOUT = "5s"  # CREATE/DROP TRIGGER queue behind long transactions on the table; give up, retry later
# The trigger function renders keys with fixed settings, so a key does not depend on the writer's
# session: timestamps in UTC and ISO format, floats in their shortest exact form.
FUNCTION_SETTINGS = (
    "SET search_path = pg_catalog, pg_temp SET \"TimeZone\" = 'UTC' SET \"DateStyle\" = 'ISO, YMD' "
    "SET \"IntervalStyle\" = 'postgres' SET extra_float_digits = '1'"
)


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def key_expression(template: Template, row: str) -> sql.Composable:
    """`task:{id}` over NEW -> 'task:'::text || (NEW."id")::text; NULL when a column is NULL."""
    assert row in ("OLD", "NEW")
    parts: list[sql.Composable] = []
    for part in template.parts:
        if isinstance(part, Column):
            parts.append(sql.SQL("(" + row + ".{})::text").format(sql.Identifier(part.name)))
        else:
            parts.append(sql.SQL("{}::text").format(sql.Literal(part)))
    return sql.SQL(" || ").join(parts)


def _values(plan: TablePlan, rows: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("({}, {})").format(key_expression(t, row), sql.Literal(tag))
        for row in rows
        for templates, tag in ((plan.keys, False), (plan.tags, True))
        for t in templates
    )


def function_sql(state_schema: str, cid: str, plan: TablePlan) -> sql.Composed:
    """CREATE OR REPLACE of the table's trigger function: the old and new rows' keys into the outbox.

    SECURITY DEFINER: the application's roles need no privilege on the outbox; the fixed search_path
    keeps that safe."""
    outbox = qualified(state_schema, outbox_table(cid))

    def insert(rows: tuple[str, ...]) -> sql.Composed:
        return sql.SQL(
            "INSERT INTO {} (key, tag) SELECT DISTINCT v.k, v.t FROM (VALUES {}) AS v(k, t) WHERE v.k IS NOT NULL;"
        ).format(outbox, _values(plan, rows))

    body = sql.SQL(
        "BEGIN IF TG_OP = 'INSERT' THEN {new} ELSIF TG_OP = 'DELETE' THEN {old} ELSE {both} END IF; "
        "PERFORM pg_notify({channel}, ''); RETURN NULL; END"
    ).format(new=insert(("NEW",)), old=insert(("OLD",)), both=insert(("OLD", "NEW")), channel=sql.Literal(channel(cid)))
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
        + FUNCTION_SETTINGS
        + " AS {}"
    ).format(
        sql.Identifier(state_schema), sql.Identifier(function_name(cid, plan.table)), sql.Literal(body.as_string(None))
    )


def truncate_function_sql(state_schema: str, cid: str, plan: TablePlan) -> sql.Composed:
    """CREATE OR REPLACE of the table's TRUNCATE function: a TRUNCATE has no rows to render keys from,
    so it writes each template's glob (task:*), and the relay deletes every key that matches."""
    outbox = qualified(state_schema, outbox_table(cid))
    rows = [
        sql.SQL("({}, {}, {})").format(sql.Literal(t.glob()), sql.Literal(tag), sql.Literal(bool(t.columns)))
        for templates, tag in ((plan.keys, False), (plan.tags, True))
        for t in templates
    ]
    body = sql.SQL(
        "BEGIN INSERT INTO {} (key, tag, pattern) VALUES {}; PERFORM pg_notify({}, ''); RETURN NULL; END"
    ).format(outbox, sql.SQL(", ").join(rows), sql.Literal(channel(cid)))
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER "
        + FUNCTION_SETTINGS
        + " AS {}"
    ).format(
        sql.Identifier(state_schema),
        sql.Identifier(truncate_function_name(cid, plan.table)),
        sql.Literal(body.as_string(None)),
    )


STATS_COLUMNS = "name text PRIMARY KEY, value float8 NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()"


def ensure_outbox(conn: psycopg.Connection, state_schema: str, cid: str) -> None:
    """The outbox, and the table the relay writes the server's INFO to."""
    ensure_state_table(conn, state_schema, outbox_table(cid), OUTBOX_COLUMNS)
    ensure_state_table(conn, state_schema, stats_table(cid), STATS_COLUMNS)


def write_stats(conn: psycopg.Connection, state_schema: str, cid: str, values: dict[str, float]) -> None:
    """The relay's latest look at the server (INFO fields by name)."""
    with conn.transaction():
        for name, value in values.items():
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (name, value) VALUES (%s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = now()"
                ).format(qualified(state_schema, stats_table(cid))),
                (name, value),
            )


def read_stats(conn: psycopg.Connection, state_schema: str, cid: str, max_age_seconds: float) -> dict[str, float]:
    """The INFO fields the relay wrote in the last max_age_seconds (none when it is down or the table is not there)."""
    if table_columns(conn, state_schema, stats_table(cid)) is None:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT name, value FROM {} WHERE updated_at > now() - make_interval(secs => %s)").format(
            qualified(state_schema, stats_table(cid))
        ),
        (max_age_seconds,),
    ).fetchall()
    return {r[0]: float(r[1]) for r in rows}


@dataclass(frozen=True)
class Installed:
    """A trigger of this Cache in the database: on which table, which one (row or truncate)."""

    schema: str
    table: str
    trigger: str


def installed(conn: psycopg.Connection, cid: str) -> list[Installed]:
    """This Cache's triggers, wherever they are (by their names, on ordinary and partitioned tables)."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.tgname = ANY(%s) AND NOT t.tgisinternal AND t.tgparentid = 0 ORDER BY 1, 2, 3",
        ([trigger_name(cid), truncate_trigger_name(cid)],),
    ).fetchall()
    return [Installed(r[0], r[1], r[2]) for r in rows]


def _functions(conn: psycopg.Connection, state_schema: str, cid: str) -> list[str]:
    rows = conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = %s AND starts_with(p.proname, %s) ORDER BY 1",
        (state_schema, function_prefix(cid)),
    ).fetchall()
    return [r[0] for r in rows]


def _drop_trigger(conn: psycopg.Connection, item: Installed) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (LOCK_TIMEOUT,))
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(item.trigger), qualified(item.schema, item.table)
            )
        )


def install(conn: psycopg.Connection, *, state_schema: str, cid: str, plans: list[TablePlan]) -> list[str]:
    """The outbox, each table's functions and triggers; triggers of tables no longer listed are dropped.

    Returns the tables whose triggers were created now. A function is replaced in place (no lock on
    the table); only creating or dropping a trigger locks its table, briefly, with a lock timeout."""
    ensure_outbox(conn, state_schema, cid)
    present = installed(conn, cid)
    wanted = {(p.table.schema_, p.table.name) for p in plans}
    for item in present:
        if (item.schema, item.table) not in wanted:
            _drop_trigger(conn, item)
    have = {(i.schema, i.table, i.trigger) for i in present}
    created = []
    for plan in plans:
        table = qualified(plan.table.schema_, plan.table.name)
        triggers = (
            (trigger_name(cid), function_name(cid, plan.table), "INSERT OR UPDATE OR DELETE", "ROW"),
            (truncate_trigger_name(cid), truncate_function_name(cid, plan.table), "TRUNCATE", "STATEMENT"),
        )
        with conn.transaction():
            conn.execute(function_sql(state_schema, cid, plan))
            conn.execute(truncate_function_sql(state_schema, cid, plan))
            missing = [t for t in triggers if (plan.table.schema_, plan.table.name, t[0]) not in have]
            if missing:
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (LOCK_TIMEOUT,))
            for trigger, function, events, level in missing:
                conn.execute(
                    sql.SQL(
                        "CREATE TRIGGER {} AFTER " + events + " ON {} FOR EACH " + level + " EXECUTE FUNCTION {}.{}()"
                    ).format(sql.Identifier(trigger), table, sql.Identifier(state_schema), sql.Identifier(function))
                )
            if missing:
                created.append(plan.label)
    keep = {f(cid, p.table) for p in plans for f in (function_name, truncate_function_name)}
    for name in _functions(conn, state_schema, cid):
        if name not in keep:
            with conn.transaction():
                conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(qualified(state_schema, name)))
    return created


def uninstall(conn: psycopg.Connection, *, state_schema: str, cid: str) -> list[str]:
    """Drop every trigger and function of this Cache, then its outbox; returns the tables cleaned."""
    cleaned: list[str] = []
    for item in installed(conn, cid):
        _drop_trigger(conn, item)
        if f"{item.schema}.{item.table}" not in cleaned:
            cleaned.append(f"{item.schema}.{item.table}")
    with conn.transaction():
        for name in _functions(conn, state_schema, cid):
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(qualified(state_schema, name)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(state_schema, outbox_table(cid))))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified(state_schema, stats_table(cid))))
    return cleaned


def outbox_exists(conn: psycopg.Connection, state_schema: str, cid: str) -> bool:
    return table_columns(conn, state_schema, outbox_table(cid)) is not None


# --- the relay ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One outbox row: a key (or a tag set) to delete, and how long ago its change was written."""

    id: int
    key: str
    tag: bool
    pattern: bool  # key is a glob (a TRUNCATE): every matching key (or tag set) goes
    age_seconds: float


def claim(conn: psycopg.Connection, state_schema: str, cid: str, limit: int) -> list[Entry]:
    """The oldest rows, locked until the caller's transaction ends (another relay skips them)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT id, key, tag, pattern, extract(epoch FROM clock_timestamp() - created_at)::float8 FROM {} "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
        ).format(qualified(state_schema, outbox_table(cid))),
        (limit,),
    ).fetchall()
    return [Entry(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def remove(conn: psycopg.Connection, state_schema: str, cid: str, ids: list[int]) -> None:
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(qualified(state_schema, outbox_table(cid))), (ids,)
    )


@dataclass(frozen=True)
class Depth:
    rows: int
    oldest_seconds: float | None


def depth(conn: psycopg.Connection, state_schema: str, cid: str) -> Depth:
    """Rows waiting and the age of the oldest (None when empty)."""
    row = conn.execute(
        sql.SQL("SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM {}").format(
            qualified(state_schema, outbox_table(cid))
        )
    ).fetchone()
    assert row is not None
    return Depth(int(row[0]), row[1])


def listen(conn: psycopg.Connection, cid: str) -> None:
    """LISTEN on the Cache's channel (an autocommit connection)."""
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel(cid))))
