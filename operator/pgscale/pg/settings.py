"""Server settings: validated against pg_settings, applied with ALTER SYSTEM, kept.

Every desired value is checked against the server's own description of the
setting (type, unit, range, allowed values) before anything is applied, so a bad
value stops the whole change. Values are compared in the setting's own unit, so
'256MB' and shared_buffers' '32768' (8kB pages) are the same value. What pgscale
manages is remembered in <stateSchema>.managed_settings: a setting removed from
the spec is reset, and a value changed outside pgscale is put back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ..errors import DependencyError
from . import ensure_state_table, table_columns

MANAGED = "managed_settings"
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
    rows = conn.execute(
        "SELECT name, setting, unit, vartype, min_val, max_val, enumvals, context, pending_restart "
        "FROM pg_settings WHERE name = ANY(%s)",
        (names,),
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
    for name, value in desired.items():
        s = known.get(name)
        if s is None:
            if "." not in name:  # custom settings (ext.name) may not be loaded yet
                out[name] = "is not a setting of this server (check the spelling)"
            continue
        if s.context == "internal":
            out[name] = "is fixed when the server is built and cannot be changed"
            continue
        try:
            normalize(s, value)
        except ValueError as exc:
            out[name] = f"= {value!r} {exc}"
    return out


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
    return {r[0]: r[1] for r in rows}


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


def reload(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_reload_conf()")


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
        "SELECT name, current_setting(name), setting, source, pending_restart FROM pg_settings WHERE name = ANY(%s)",
        (names,),
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
