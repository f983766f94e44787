"""Preparation of a RetentionPolicy, shared by its controller and its job: the checks a run
makes, the plan with every foreign key into the table, the archive tables, and the
refusal when a relationship is unresolved.

The controller runs exactly what a run would, with the same role, so a policy that cannot
run is never Ready.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import psycopg

from .. import pg
from ..api.retentionpolicy import RetentionPolicySpec
from ..checks import TIME_TYPES, require_column, require_table
from ..errors import DependencyError, SpecError
from ..pg import export as sqle
from ..pg import relationships
from ..pg import retention as sqlr
from ..pg.relationships import ForeignKey
from .planning import Relationships, TableFacts, check_archive, plan, plan_relationships


@dataclass
class Prepared:
    """A checked, planned policy: the batch target, its relationships, the archive tables created now."""

    target: sqlr.Target
    relationships: Relationships
    created: list[str] = field(default_factory=list)


def prepare(conn: psycopg.Connection, spec: RetentionPolicySpec, state_schema: str) -> Prepared:
    """Check the table, plan the batches with every foreign key into the rows they remove,
    make the archive tables and the run log exist.

    Nothing is created while a relationship is unresolved (the caller refuses to run).
    """
    columns = require_table(conn, spec.table)
    require_column(columns, spec.age_column, "ageColumn", spec.table, TIME_TYPES, "timestamp, timestamptz or date")
    for i, row_filter in enumerate(spec.filters):
        require_column(columns, row_filter.column, f"filters[{i}].column", spec.table)
    edges = relationships.reachable(conn, spec.table.schema_, spec.table.name)
    facts: dict[tuple[str, str], TableFacts] = {}
    for fk in edges:
        if fk.child in facts:  # several keys from one table: read it once
            continue
        child_columns = pg.table_columns(conn, fk.schema, fk.table) or {}
        facts[fk.child] = TableFacts(tuple(child_columns), pg.is_partitioned(conn, fk.schema, fk.table))
    rels = plan_relationships(spec, edges, facts)
    target = plan(
        spec,
        columns,
        key_columns=sqlr.primary_key(conn, spec.table.schema_, spec.table.name),
        partitioned=pg.is_partitioned(conn, spec.table.schema_, spec.table.name),
        children=rels.plans,
    )
    if rels.plans:  # what the plan was made for: a batch after a change of these keys moves nothing
        target = replace(target, fingerprint=relationships.fingerprint(conn, target.tables))
    prepared = Prepared(target, rels)
    if rels.unresolved:
        return prepared
    if hidden := relationships.row_security_hides(conn, target.tables):
        raise DependencyError(
            f"row-level security on {', '.join(hidden)} hides rows from the role, while ON DELETE actions "
            f"act on every row: a run could delete rows it never saw. Run it as the tables' owner, or "
            f"ALTER ROLE {conn.info.user} BYPASSRLS",
            reason="InsufficientPrivilege",
        )
    if grants := sqlr.missing_privileges(conn, target):
        raise DependencyError(
            f"the role cannot lock, read or move the rows runs of this policy touch: {'; '.join(grants)} "
            "(for a table that references the policy's table, setting spec.children to keep for it needs "
            "only SELECT)",
            reason="InsufficientPrivilege",
        )
    sqlr.ensure_run_log(conn, state_schema)
    if spec.action == "export":
        sqle.ensure_ledger(conn, state_schema)
    if target.archive is not None:
        existing = sqlr.archive_columns(conn, target)
        check_archive(spec, columns, existing)
        if existing is None:
            sqlr.create_archive(conn, target)
            prepared.created.append(f"{target.archive_schema or target.schema}.{target.archive_table}")
    seen: set[tuple[str | None, str | None]] = {(target.archive_schema or target.schema, target.archive_table)}
    for child in target.plans():
        if child.archive is None or (child.archive_schema, child.archive_table) in seen or child.fk.self_reference:
            continue
        seen.add((child.archive_schema, child.archive_table))
        source = pg.table_columns(conn, child.fk.schema, child.fk.table) or {}
        existing = pg.table_columns(conn, child.archive_schema or child.fk.schema, child.archive_table or "")
        field_name = "children.tables"
        if existing is None:
            try:
                sqlr.create_child_archive(conn, child)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise DependencyError(
                    f'the role cannot create the archive table "{child.archive_schema}"."{child.archive_table}" '
                    f'({str(exc).strip()}): grant it CREATE on schema "{child.archive_schema}", or create the '
                    "table yourself with the columns of the table it archives",
                    reason="InsufficientPrivilege",
                ) from exc
            prepared.created.append(f"{child.archive_schema}.{child.archive_table}")
        elif problems := sqlr.archive_problems(source, existing):
            raise SpecError(
                field_name,
                f'archive table "{child.archive_schema}"."{child.archive_table}" cannot hold the rows of '
                f'"{child.fk.schema}"."{child.fk.table}": {"; ".join(problems)}. Add the columns or set '
                "archiveTable for it",
                reason="ArchiveMismatch",
            )
    return prepared


Stake = dict[ForeignKey, int | None]


def unresolved_error(prepared: Prepared, at_stake: Stake) -> SpecError:
    """The Stalled condition of a policy whose table is referenced destructively and children is unset."""
    lines = []
    for fk in prepared.relationships.unresolved:
        rows = at_stake.get(fk)
        count = "an unknown number of" if rows is None else str(rows)
        lines.append(f"{fk.describe()} ({count} rows reference rows the next run would remove)")
    return SpecError(
        "children.mode",
        "rows of other tables reference the rows this policy removes, and deleting their parents would "
        f"delete or change them: {'; '.join(lines)}. Nothing was changed. Set spec.children.mode "
        "(archive: move them with their parents; delete: let them go as ON DELETE says; keep: skip "
        "parents that have them), or set it per table in spec.children.tables",
        reason="ReferencedByForeignKeys",
    )


def at_stake(conn: psycopg.Connection, prepared: Prepared, cutoff: Any) -> Stake:
    """Rows per constraint that the next run would touch, for status, messages and dry runs."""
    return {
        item.fk: sqlr.count_referencing(conn, prepared.target, cutoff, item.chain)
        for item in prepared.relationships.listed
    }
