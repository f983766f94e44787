"""Checks of a spec against the live database, each failing with the field and the fix."""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from . import pg
from .api.common import TableReference
from .errors import DependencyError, SpecError


def base_type(formatted: str) -> str:
    """A type without its modifiers: timestamp(3) with time zone -> timestamp with time zone."""
    return re.sub(r"\(\d+(,\d+)?\)", "", formatted).replace("  ", " ").strip()


TIME_TYPES = frozenset({"timestamp without time zone", "timestamp with time zone", "date"})
TEXT_TYPES = frozenset({"text", "character varying"})


def require_table(
    conn: psycopg.Connection,
    table: TableReference,
    field: str = "table",
    privileges: tuple[str, ...] = ("SELECT",),
    owner: bool = False,
) -> dict[str, pg.Column]:
    """The table's columns; SpecError when it does not exist or is not a table, DependencyError naming the
    exact GRANT when the connection's role may not use it (else the first statement fails obscurely)."""
    columns = pg.table_columns(conn, table.schema_, table.name)
    if columns is None:
        kind = pg.relation_kind(conn, table.schema_, table.name)
        if kind is not None:
            raise SpecError(
                field,
                f"{table.qualified()} is {kind}, not a table; pgscale works on ordinary and partitioned tables: "
                f"point spec.{field} at the table behind it",
                reason="NotATable",
            )
        raise SpecError(
            field,
            f"table {table.qualified()} does not exist in database {conn.info.dbname!r}; names are "
            f"case-sensitive: check spec.{field}.schema and spec.{field}.name",
            reason="TableNotFound",
        )
    require_access(conn, table, privileges, owner)
    return columns


def require_access(conn: psycopg.Connection, table: TableReference, privileges: tuple[str, ...], owner: bool) -> None:
    """DependencyError with the GRANT the role lacks: schema USAGE first, then ownership, then privileges."""
    access = pg.table_access(conn, table.schema_, table.name, privileges)
    role = sql.Identifier(access.role).as_string(None)
    schema = sql.Identifier(table.schema_).as_string(None)
    if not access.schema_usage:
        grant = f"GRANT USAGE ON SCHEMA {schema} TO {role}"
        what = f"USAGE on schema {schema}"
    elif owner and not access.is_owner:
        grant = f"GRANT {sql.Identifier(access.owner).as_string(None)} TO {role}"
        what = f"ownership of {table.qualified()} (owned by {access.owner!r}; altering and partitioning it needs it)"
    elif access.missing:
        target = sql.Identifier(table.schema_, table.name).as_string(None)
        grant = f"GRANT {', '.join(access.missing)} ON {target} TO {role}"
        what = f"{', '.join(access.missing)} on {table.qualified()}"
    else:
        return
    raise DependencyError(
        f"role {access.role!r} lacks {what}: run `{grant}` as the owner or a superuser (or use another role in "
        "the profile's Secret)",
        reason="InsufficientPrivilege",
    )


def require_column(
    columns: dict[str, pg.Column],
    name: str,
    field: str,
    table: TableReference,
    types: frozenset[str] | None = None,
    what: str = "",
) -> pg.Column:
    """A column of the table, optionally of one of some types."""
    column = columns.get(name)
    if column is None:
        near = [c for c in columns if c.lower() == name.lower()]
        hint = f" (did you mean {near[0]!r}? names are case-sensitive)" if near else ""
        raise SpecError(field, f"column {name!r} does not exist in {table.qualified()}{hint}", reason="ColumnNotFound")
    if types is not None and base_type(column.type) not in types:
        raise SpecError(
            field,
            f"column {name!r} of {table.qualified()} is {column.type}; it must be {what}",
            reason="ColumnTypeMismatch",
        )
    return column
