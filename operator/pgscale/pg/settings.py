"""Server settings: validated against pg_settings, applied with ALTER SYSTEM or ALTER DATABASE, kept.

Every desired value is checked against the server's own description of the
setting (type, unit, range, allowed values) before anything is applied, so a bad
value stops the whole change. Values are compared in the setting's own unit, so
'256MB' and shared_buffers' '32768' (8kB pages) are the same value. What pgscale
manages is remembered in <stateSchema>.managed_settings (ALTER SYSTEM) and
<stateSchema>.managed_database_settings (ALTER DATABASE / ALTER ROLE ... IN DATABASE):
a setting removed from the spec is reset, and a value changed outside pgscale is put back.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..errors import DependencyError
from . import ensure_state_table, table_columns
from .connection import ConnInfo

MANAGED = "managed_settings"
MANAGED_DATABASE = "managed_database_settings"
_MEMORY = {"B": 1 / 1024, "kB": 1, "MB": 1024, "GB": 1024**2, "TB": 1024**3}  # in kB
_TIME = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}  # in ms
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")
_TRUE = {"on", "true", "yes", "1", "t", "y"}
_FALSE = {"off", "false", "no", "0", "f", "n"}


@dataclass(frozen=True)
class Setting:
    """A row of pg_settings."""

    name: str
    setting: str
    unit: str | None
    vartype: str
    min_val: str | None
    max_val: str | None
    enumvals: tuple[str, ...]
    context: str
    pending_restart: bool


def describe(conn: psycopg.Connection, names: list[str]) -> dict[str, Setting]:
    """pg_settings rows by lower-case name (specs name DateStyle and TimeZone in lower case)."""
    rows = conn.execute(
        "SELECT lower(name), setting, unit, vartype, min_val, max_val, enumvals, context, pending_restart "
        "FROM pg_settings WHERE lower(name) = ANY(%s)",
        ([n.lower() for n in names],),
    ).fetchall()
    return {r[0]: Setting(r[0], r[1], r[2], r[3], r[4], r[5], tuple(r[6] or ()), r[7], bool(r[8])) for r in rows}


def _unit_scale(unit: str | None) -> tuple[dict[str, float], float] | None:
    """The unit family of a setting and the size of its base unit in that family."""
    if unit is None:
        return None
    match = re.match(r"^(\d*)(\w+)$", unit)
    if not match:
        return None
    factor = float(match.group(1) or 1)
    for family in (_MEMORY, _TIME):
        if match.group(2) in family:
            return family, factor * family[match.group(2)]
    return None


def normalize(s: Setting, value: str) -> str | float | bool:
    """A value as the setting's own unit/type would hold it; ValueError names what is wrong."""
    text = value.strip()
    if s.vartype == "bool":
        word = text.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError("expects on or off")
    if s.vartype == "enum":
        if text.lower() not in {v.lower() for v in s.enumvals}:
            raise ValueError(f"expects one of {', '.join(s.enumvals)}")
        return text.lower()
    if s.vartype in ("integer", "real"):
        match = _NUMBER.match(text)
        if not match:
            raise ValueError(f"expects a number{' with a unit like ' + s.unit if s.unit else ''}")
        number, unit = float(match.group(1)), match.group(2)
        scale = _unit_scale(s.unit)
        if unit:
            if scale is None or unit not in scale[0]:
                valid = ", ".join(scale[0]) if scale else "none"
                raise ValueError(f"invalid unit {unit!r}; valid units for this setting are {valid}")
            number = number * scale[0][unit] / scale[1]
        if s.vartype == "integer":
            number = float(round(number))
        low = float(s.min_val) if s.min_val is not None else None
        high = float(s.max_val) if s.max_val is not None else None
        if low is not None and number < low and number != -1:  # -1 often means "default/off"
            raise ValueError(f"is below the minimum {s.min_val}{s.unit or ''}")
        if high is not None and number > high:
            raise ValueError(f"is above the maximum {s.max_val}{s.unit or ''}")
        return number
    return text.strip("'")


def problems(conn: psycopg.Connection, desired: dict[str, str]) -> dict[str, str]:
    """name -> what is wrong with its value; empty when everything can be applied."""
    known = describe(conn, list(desired))
    out = {}
    hidden: bool | None = None
    for name, value in desired.items():
        s = known.get(name)
        if s is None:
            if "." not in name:  # custom settings (ext.name) may not be loaded yet
                if hidden is None:  # pg_settings leaves out superuser-only settings for other roles
                    hidden = not _sees_all_settings(conn)
                out[name] = (
                    "is not a setting this role can see (check the spelling, or GRANT pg_read_all_settings to the "
                    "role: settings such as shared_preload_libraries are hidden from other roles)"
                    if hidden
                    else "is not a setting of this server (check the spelling)"
                )
            continue
        if s.context == "internal":
            out[name] = "is fixed when the server is built and cannot be changed"
            continue
        try:
            normalize(s, value)
        except ValueError as exc:
            out[name] = f"= {value!r} {exc}"
    return out


def _sees_all_settings(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT pg_has_role('pg_read_all_settings', 'USAGE')").fetchone()
    return bool(row and row[0])


def _name(name: str) -> sql.Composable:
    return sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))


def system_identifier(conn: psycopg.Connection) -> str:
    """The server's identity (the same on its physical replicas): what ALTER SYSTEM's settings belong to.

    pg_control_system() is executable by every role."""
    row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0])


def configured(conn: psycopg.Connection) -> dict[str, str]:
    """What postgresql.auto.conf (ALTER SYSTEM) holds now."""
    rows = conn.execute(
        "SELECT name, setting FROM pg_file_settings WHERE sourcefile LIKE '%%postgresql.auto.conf' ORDER BY seqno"
    ).fetchall()
    return {r[0].lower(): r[1] for r in rows}


def same(s: Setting | None, a: str | None, b: str | None) -> bool:
    """Whether two textual values are the same value of a setting."""
    if a is None or b is None:
        return a is b
    if s is None:
        return a.strip() == b.strip()
    try:
        return normalize(s, a) == normalize(s, b)
    except ValueError:
        return a.strip() == b.strip()


def alter_system(conn: psycopg.Connection, name: str, value: str | None) -> None:
    """ALTER SYSTEM SET (or RESET when value is None); the name and value are never spliced.

    PostgreSQL 17+ refuses every ALTER SYSTEM when allow_alter_system is off (CloudNativePG's
    default): a DependencyError saying so, raised at the first statement, so nothing was written."""
    if value is None:
        statement = sql.SQL("ALTER SYSTEM RESET {}").format(_name(name))
    else:
        statement = sql.SQL("ALTER SYSTEM SET {} = {}").format(_name(name), sql.Literal(value))
    try:
        conn.execute(statement)
    except psycopg.errors.FeatureNotSupported as exc:
        if not alter_system_disabled(conn):
            raise
        raise DependencyError(
            f"the server refuses ALTER SYSTEM ({str(exc).strip()}: allow_alter_system = off); set "
            "allow_alter_system = on in its postgresql.conf, or let spec.settings.method pick another way "
            "(database, or cloudnativepg for a CloudNativePG Cluster)",
            reason="AlterSystemDisabled",
        ) from exc


def alter_system_disabled(conn: psycopg.Connection) -> bool:
    """Whether the server has ALTER SYSTEM turned off (allow_alter_system, PostgreSQL 17+; absent before)."""
    row = conn.execute("SELECT current_setting('allow_alter_system', true)").fetchone()
    return row is not None and row[0] == "off"


def reload(conn: psycopg.Connection, wait_seconds: float = 5.0) -> None:
    """pg_reload_conf(), then wait until this session has read the files again: the postmaster
    signals backends asynchronously, and values read back before that would be the old ones
    (a fresh value reported as overridden, a restart not yet pending)."""
    before = conn.execute("SELECT pg_conf_load_time()").fetchone()
    conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        now = conn.execute("SELECT pg_conf_load_time()").fetchone()
        if before is None or now is None or now[0] > before[0]:
            return
        time.sleep(0.01)


@dataclass(frozen=True)
class Effective:
    """A setting as the server runs it."""

    shown: str  # as SHOW prints it
    raw: str  # pg_settings.setting, in the setting's own unit
    source: str  # where the running value comes from (configuration file, command line, ...)
    pending_restart: bool


def effective(conn: psycopg.Connection, names: list[str]) -> dict[str, Effective]:
    """The running values (after a reload)."""
    rows = conn.execute(
        "SELECT lower(name), current_setting(name), setting, source, pending_restart FROM pg_settings "
        "WHERE lower(name) = ANY(%s)",
        ([n.lower() for n in names],),
    ).fetchall()
    return {r[0]: Effective(r[1], r[2], r[3], bool(r[4])) for r in rows}


def ensure_managed(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(
        conn,
        state_schema,
        MANAGED,
        "profile text NOT NULL, name text NOT NULL, value text NOT NULL, "
        "updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (profile, name)",
    )


def managed(conn: psycopg.Connection, state_schema: str, profile: str) -> dict[str, str]:
    if table_columns(conn, state_schema, MANAGED) is None:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT name, value FROM {}.{} WHERE profile = %s").format(
            sql.Identifier(state_schema), sql.Identifier(MANAGED)
        ),
        (profile,),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def remember(conn: psycopg.Connection, state_schema: str, profile: str, values: dict[str, str]) -> None:
    """Replace the record of what this profile manages."""
    table = sql.SQL("{}.{}").format(sql.Identifier(state_schema), sql.Identifier(MANAGED))
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {} WHERE profile = %s").format(table), (profile,))
        for name, value in values.items():
            conn.execute(
                sql.SQL("INSERT INTO {} (profile, name, value) VALUES (%s, %s, %s)").format(table),
                (profile, name, value),
            )


# --- what the role may do -------------------------------------------------------------


@dataclass(frozen=True)
class Privileges:
    """What the connection's role may do with settings on this server, read from the catalog.

    Facts for settings_method.resolve (which way settings go) and for placing each setting."""

    role: str
    superuser: bool
    version_num: int
    allow_alter_system: bool  # False only where PostgreSQL 17+ runs with allow_alter_system = off
    file_settings: bool  # may read pg_file_settings (the view and its function)
    reload: bool  # may run pg_reload_conf()
    database: str  # current_database()
    database_owner: bool  # may ALTER DATABASE ... SET: owns the database (or has its owner's privileges)
    alter_system: frozenset[str] = frozenset()  # of the names asked about: those it may ALTER SYSTEM
    set: frozenset[str] = frozenset()  # of the names asked about: superuser settings it may SET (GRANT SET)


def privileges(conn: psycopg.Connection, names: list[str]) -> Privileges:
    """The role's privileges for settings, and per name (PostgreSQL 15+ grants them per parameter)."""
    row = conn.execute(
        "SELECT current_user::text, r.rolsuper, current_setting('server_version_num')::int, "
        "coalesce(current_setting('allow_alter_system', true), 'on') <> 'off', "
        "has_table_privilege('pg_catalog.pg_file_settings', 'SELECT') "
        "AND has_function_privilege('pg_catalog.pg_show_all_file_settings()', 'EXECUTE'), "
        "has_function_privilege('pg_catalog.pg_reload_conf()', 'EXECUTE'), "
        "current_database()::text, pg_has_role(d.datdba, 'USAGE') "
        "FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()"
    ).fetchone()
    assert row is not None
    role, superuser, version, allowed, file_settings, reload_ok, database, owner = row
    alter, settable = frozenset(names), frozenset(names)
    if not superuser:
        alter = settable = frozenset()
        if version >= 150000 and names:  # GRANT ALTER SYSTEM / SET ON PARAMETER came with 15
            rows = conn.execute(
                "SELECT n, has_parameter_privilege(n, 'ALTER SYSTEM'), has_parameter_privilege(n, 'SET') "
                "FROM unnest(%s::text[]) n",
                (names,),
            ).fetchall()
            alter = frozenset(r[0] for r in rows if r[1])
            settable = frozenset(r[0] for r in rows if r[2])
    return Privileges(
        role=str(role),
        superuser=bool(superuser),
        version_num=int(version),
        allow_alter_system=bool(allowed),
        file_settings=bool(superuser or file_settings),
        reload=bool(superuser or reload_ok),
        database=str(database),
        database_owner=bool(superuser or owner),
        alter_system=alter,
        set=settable,
    )


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


# --- per-database values (ALTER DATABASE / ALTER ROLE ... IN DATABASE) ------------------


def database_settings(conn: psycopg.Connection, role: str | None) -> dict[str, str]:
    """What pg_db_role_setting holds for this database: for every role (role None), or for one role.

    What a new session starts with: these values win over the server's configuration (and a
    role's over the database's). Readable by every role."""
    rows = conn.execute(
        "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = current_database() AND s.setrole = "
        "CASE WHEN %(role)s::text IS NULL THEN 0 ELSE (SELECT oid FROM pg_roles WHERE rolname = %(role)s) END",
        {"role": role},
    ).fetchall()
    out: dict[str, str] = {}
    for (config,) in rows:
        for item in config or []:
            name, _, value = str(item).partition("=")
            out[name.lower()] = value
    return out


def _target(database: str, role: str | None) -> sql.Composable:
    if role is None:
        return sql.SQL("ALTER DATABASE {}").format(sql.Identifier(database))
    return sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role), sql.Identifier(database))


def alter_database(
    conn: psycopg.Connection, database: str, name: str, value: str | list[str] | None, role: str | None = None
) -> None:
    """ALTER DATABASE (or ALTER ROLE ... IN DATABASE) SET, or RESET when value is None.

    A list (a list setting such as search_path) is sent as one literal per element, as
    `SET search_path = '$user', 'public'`: one literal would be one element."""
    target = _target(database, role)
    if value is None:
        conn.execute(sql.SQL("{} RESET {}").format(target, _name(name)))
        return
    items = value if isinstance(value, list) else [value]
    conn.execute(
        sql.SQL("{} SET {} = {}").format(target, _name(name), sql.SQL(", ").join(sql.Literal(v) for v in items))
    )


def list_items(value: str) -> list[str]:
    """A setting's text as the elements of a list, as postgresql.conf reads a list setting:
    split at commas outside double quotes; quoted text keeps its case, the rest is trimmed and
    lower-cased (search_path's `Public` is `public`, `"Public"` is `Public`)."""
    items: list[str] = []
    inside: list[str] = []  # quoted text of the current element
    outside: list[str] = []  # unquoted text of the current element
    quoted = False
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == '"' and value[i + 1 : i + 2] == '"':
                inside.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                inside.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ",":
            items.append("".join(inside) + "".join(outside).strip().lower())
            inside, outside = [], []
        else:
            outside.append(ch)
        i += 1
    items.append("".join(inside) + "".join(outside).strip().lower())
    return items


def listed(value: str) -> bool:
    """Whether a string setting's value is written as a list (commas or quoted elements)."""
    return "," in value or '"' in value


def same_stored(s: Setting | None, a: str | None, b: str | None) -> bool:
    """Whether two values are the same, comparing a string setting written as a list element by element
    (pg_db_role_setting stores `search_path` quoted differently from what a spec says)."""
    if a is not None and b is not None and (s is None or s.vartype == "string") and (listed(a) or listed(b)):
        return list_items(a) == list_items(b)
    return same(s, a, b)


def session_effective(info: ConnInfo, names: list[str]) -> dict[str, Effective]:
    """The values a new session of the connection's role sees (what ALTER DATABASE ... SET gives it):
    the reconciling session started before the change and keeps its old values."""
    from . import connect

    with connect(info) as conn:
        return effective(conn, names)


def ensure_managed_database(conn: psycopg.Connection, state_schema: str) -> None:
    ensure_state_table(
        conn,
        state_schema,
        MANAGED_DATABASE,
        "profile text NOT NULL, role text NOT NULL, name text NOT NULL, value text NOT NULL, "
        "updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (profile, role, name)",
    )


def records_readable(conn: psycopg.Connection, state_schema: str, table: str) -> bool:
    """Whether a bookkeeping table exists and this role may read and change it (a profile's records
    written by another role are not its to undo)."""
    row = conn.execute(
        "SELECT has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'DELETE') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
        "AND has_schema_privilege(n.oid, 'USAGE')",
        (state_schema, table),
    ).fetchone()
    return bool(row and row[0])


def managed_database(conn: psycopg.Connection, state_schema: str, profile: str) -> dict[tuple[str, str], str]:
    """(role, name) -> value this profile set per database; role '' is ALTER DATABASE (every role)."""
    if table_columns(conn, state_schema, MANAGED_DATABASE) is None:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT role, name, value FROM {}.{} WHERE profile = %s").format(
            sql.Identifier(state_schema), sql.Identifier(MANAGED_DATABASE)
        ),
        (profile,),
    ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def remember_database(
    conn: psycopg.Connection, state_schema: str, profile: str, values: dict[tuple[str, str], str]
) -> None:
    """Replace the record of what this profile set per database."""
    table = sql.SQL("{}.{}").format(sql.Identifier(state_schema), sql.Identifier(MANAGED_DATABASE))
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {} WHERE profile = %s").format(table), (profile,))
        for (role, name), value in values.items():
            conn.execute(
                sql.SQL("INSERT INTO {} (profile, role, name, value) VALUES (%s, %s, %s, %s)").format(table),
                (profile, role, name, value),
            )
