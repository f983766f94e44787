"""Checks of a spec against the live database, each failing with the field and the fix."""

from __future__ import annotations

import re

import psycopg

from . import pg
from .api.common import TableReference
from .errors import SpecError


def base_type(formatted: str) -> str:
    """A type without its modifiers: timestamp(3) with time zone -> timestamp with time zone."""
    return re.sub(r"\(\d+(,\d+)?\)", "", formatted).replace("  ", " ").strip()


TIME_TYPES = frozenset({"timestamp without time zone", "timestamp with time zone", "date"})
TEXT_TYPES = frozenset({"text", "character varying"})


def require_table(conn: psycopg.Connection, table: TableReference, field: str = "table") -> dict[str, pg.Column]:
    """The table's columns; SpecError when the table does not exist."""
    columns = pg.table_columns(conn, table.schema_, table.name)
    if columns is None:
        raise SpecError(
            field,
            f"table {table.qualified()} does not exist in database {conn.info.dbname!r}; names are "
            f"case-sensitive: check spec.{field}.schema and spec.{field}.name",
            reason="TableNotFound",
        )
    return columns


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
